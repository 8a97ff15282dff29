"""LoRA settings shared by layers, the model builder, checkpoints and training configs, and the projection table
their targets are named from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_bdlora.sharding import LayerKind, Mode, parse_mode


@dataclass(frozen=True)
class FusedLayer:
    """One megatron linear layer of a Llama decoder layer and the HF projections it carries."""

    name: str  # megatron's: linear_qkv, linear_proj, linear_fc1, linear_fc2
    megatron_module: str  # the megatron submodule holding it: "self_attention" or "mlp"
    hf_module: str  # the HF module holding its projections: "self_attn" or "mlp"
    kind: LayerKind
    projections: tuple[str, ...]  # HF names (PEFT's target names), in fused order


# The projection table: which megatron layer fuses which HF projections, and its kind. Every list of targets,
# kinds and fusions in the package derives from it.
FUSED_LAYERS = (
    FusedLayer("linear_qkv", "self_attention", "self_attn", LayerKind.COLUMN, ("q_proj", "k_proj", "v_proj")),
    FusedLayer("linear_proj", "self_attention", "self_attn", LayerKind.ROW, ("o_proj",)),
    FusedLayer("linear_fc1", "mlp", "mlp", LayerKind.COLUMN, ("gate_proj", "up_proj")),
    FusedLayer("linear_fc2", "mlp", "mlp", LayerKind.ROW, ("down_proj",)),
)
ALL_TARGETS = tuple(p for layer in FUSED_LAYERS for p in layer.projections)
# BD mode: column targets have a block-diagonal B, row targets a block-diagonal A
COLUMN_TARGETS = tuple(p for layer in FUSED_LAYERS if layer.kind is LayerKind.COLUMN for p in layer.projections)
ROW_TARGETS = tuple(p for layer in FUSED_LAYERS if layer.kind is LayerKind.ROW for p in layer.projections)


@dataclass(frozen=True)
class LoRASettings:
    """What a user chooses for an adapter: rank, scaling, dropout, targets, sharding mode and block count."""

    rank: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    dropout: float = 0.0
    mode: Mode = Mode.BLOCK_DIAGONAL
    nblocks: int | None = None  # block-diagonal mode only; None = the TP degree
    targets: tuple[str, ...] = field(default=ALL_TARGETS)
    seed: int = 0  # master seed of the A initialisation (TP-invariant)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_mode(self.mode))
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {unknown}; expected a subset of {list(ALL_TARGETS)}")
        if self.nblocks is not None and self.mode is not Mode.BLOCK_DIAGONAL:
            raise ValueError(f"nblocks={self.nblocks} only applies to mode block_diagonal, not {self.mode.value}")

    @property
    def scaling(self) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def nblocks_for(self, tp: int) -> int | None:
        """Block count at this TP degree (None outside BD mode)."""
        if self.mode is not Mode.BLOCK_DIAGONAL:
            return None
        return tp if self.nblocks is None else self.nblocks
