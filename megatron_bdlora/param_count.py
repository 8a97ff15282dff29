"""Adapter parameter counts of LoRA vs BD-LoRA on a Llama-architecture model, and the parameter-matched BD rank.

Shapes come from `targets.lora_plan` (HF projection table + `ShardingPlan`); nothing here re-derives them.
LoRA is counted in mode "replicated" (r (d_in + d_out) per projection) and BD-LoRA in mode "block_diagonal"
with N blocks at TP degree N (column: r (d_in + d_out / N), row: r (d_in / N + d_out)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from megatron_bdlora.config import ALL_TARGETS, LoRASettings
from megatron_bdlora.sharding import Mode, parse_mode
from megatron_bdlora.targets import cfg_field, llama_projections, lora_plan

# HF config.json fields of the shapes we compare on: what the projection table reads, plus depth; plus what the
# trainer's dry run needs for weight memory and RoPE when the model directory is not at hand (the models' own
# config.json values).
_LLAMA_3_1 = dict(
    vocab_size=128256,
    tie_word_embeddings=False,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
)
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
        **_LLAMA_3_1,
    ),
    "llama-3.1-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=80,
        **_LLAMA_3_1,
    ),
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
        vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
    ),
}


@dataclass(frozen=True)
class CountRow:
    """One line of the LoRA-vs-BD comparison: an adapter configuration and its size relative to LoRA."""

    label: str  # e.g. "BD 2r"
    mode: str  # "replicated" (plain LoRA) or "block_diagonal"
    rank: int
    parameters: int
    ratio: float  # parameters / LoRA parameters at the requested rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def num_layers(hf_config: Any) -> int:
    """Decoder layers of the model: every layer carries one adapter per target."""
    layers = cfg_field(hf_config, "num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError(f"HF config num_hidden_layers must be a positive integer, got {layers!r}")
    return layers


def _check_targets(hf_config: Any, targets: Sequence[str]) -> None:
    """Targets must be distinct known projections with positive integer shapes (a duplicate would count twice)."""
    if not targets:
        raise ValueError(f"no LoRA targets given; expected a subset of {list(ALL_TARGETS)}")
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; expected a subset of {list(ALL_TARGETS)}")
    duplicated = sorted({t for t in targets if list(targets).count(t) > 1})
    if duplicated:
        raise ValueError(f"LoRA target(s) listed more than once: {duplicated}")
    projections = llama_projections(hf_config)
    for t in targets:
        p = projections[t]
        for name, dim in (("d_in", p.d_in), ("d_out", p.d_out)):
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
                raise ValueError(f"HF config gives {t} {name}={dim!r}; expected a positive integer")


def count_parameters(
    hf_config: Any, targets: Sequence[str], mode: Mode | str, rank: int, nblocks: int | None = None
) -> int:
    """Adapter parameters over the whole model (all layers, all ranks), to compare adapter budgets.

    `nblocks` is required for block_diagonal (counted at TP degree nblocks) and must be None or 1 otherwise.
    ValueError names a rank or shape the sharding plan cannot use.
    """
    mode = parse_mode(mode)
    if mode is Mode.BLOCK_DIAGONAL:
        if nblocks is None:
            raise ValueError("block_diagonal counts need nblocks")
        settings_nblocks, tp = nblocks, nblocks
    else:
        if nblocks not in (None, 1):
            raise ValueError(f"nblocks={nblocks} only applies to mode block_diagonal, not {mode.value}")
        settings_nblocks, tp = None, 1
    _check_targets(hf_config, targets)
    settings = LoRASettings(rank=rank, mode=mode, nblocks=settings_nblocks, targets=tuple(targets))
    per_layer = 0
    for t in settings.targets:
        try:
            per_layer += lora_plan(hf_config, t, settings, tp).num_parameters()
        except ValueError as e:
            raise ValueError(f"{mode.value} adapter on {t} at rank {rank}: {e}") from None
    return per_layer * num_layers(hf_config)


def match_bd_rank(hf_config: Any, targets: Sequence[str], nblocks: int, lora_rank: int) -> int:
    """Largest BD rank (a multiple of nblocks) whose parameter count does not exceed LoRA's at lora_rank.

    PEFT's rule: raise the BD rank in steps of nblocks, starting at nblocks, until its count exceeds
    LoRA's, then step back once. ValueError if even rank nblocks is larger than the LoRA adapter.
    """
    budget = count_parameters(hf_config, targets, Mode.REPLICATED, lora_rank)
    if nblocks < 1:
        raise ValueError(f"nblocks must be positive, got {nblocks}")
    rank = nblocks
    while count_parameters(hf_config, targets, Mode.BLOCK_DIAGONAL, rank, nblocks) <= budget:
        rank += nblocks
    matched = rank - nblocks
    if matched < nblocks:
        raise ValueError(
            f"no BD rank fits the LoRA budget: BD at rank {nblocks} (nblocks={nblocks}) already has more "
            f"parameters than LoRA at rank {lora_rank} ({budget})"
        )
    return matched


def comparison_rows(hf_config: Any, targets: Sequence[str], nblocks: int, lora_rank: int) -> list[CountRow]:
    """LoRA at rank r, then BD at r, 2r, 4r (those divisible by nblocks) and at the matched rank, with ratios to
    LoRA."""
    lora = count_parameters(hf_config, targets, Mode.REPLICATED, lora_rank)
    rows = [CountRow("LoRA r", Mode.REPLICATED.value, lora_rank, lora, 1.0)]
    bd_ranks = [("BD r", lora_rank), ("BD 2r", 2 * lora_rank), ("BD 4r", 4 * lora_rank)]
    bd_ranks.append(("BD matched", match_bd_rank(hf_config, targets, nblocks, lora_rank)))
    for label, rank in bd_ranks:
        if rank % nblocks:  # BD needs rank divisible by the block count: no such adapter exists
            continue
        n = count_parameters(hf_config, targets, Mode.BLOCK_DIAGONAL, rank, nblocks)
        rows.append(CountRow(label, Mode.BLOCK_DIAGONAL.value, rank, n, n / lora))
    return rows
