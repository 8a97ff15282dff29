"""Adapters as the serving model holds them: validated host copies of one rank's slices, written into slots.

An adapter directory (native or PEFT) is read into memory once, hashed (a reading with other bytes than the one
registered is refused: a name never serves other weights than those it was loaded with), parsed by the one adapter
reader (checkpoint/reader.py: checked against the base model, converted to the server's sharding mode at the
server's TP, exactly or refused with the reason), checked against the slot capacity, and kept on the host as this
rank's slices. Writing it into a slot copies
each layer's slices into that slot's share of the layer's factor stacks; an adapter keeps its own rank
and block count there (no padding work).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_bdlora.checkpoint.adapters import AdapterFiles, factor_key
from megatron_bdlora.checkpoint.reader import read_adapter
from megatron_bdlora.config import ALL_TARGETS, LoRASettings
from megatron_bdlora.sharding import Mode, ShardingPlan


class AdapterChangedError(ValueError):
    """An adapter directory read again with other bytes than when it was loaded (replaced or rewritten since)."""

    def __init__(self, directory: str | Path, expected: str, actual: str) -> None:
        super().__init__(
            f"adapter files in {directory} changed on disk since it was loaded (sha256 {actual} != {expected})"
        )
        self.directory, self.expected, self.actual = str(directory), expected, actual

    def __reduce__(self) -> tuple:  # picklable with its fields (exceptions pickle their message args by default)
        return type(self), (self.directory, self.expected, self.actual)


@dataclass
class HostAdapter:
    """One adapter on the host: settings, per-projection plans at the server's TP and mode, this rank's slices."""

    name: str
    path: str
    settings: LoRASettings
    plans: dict[str, ShardingPlan]
    shards: dict[str, torch.Tensor]  # native keys layers.{l}.{proj}.lora_A|B -> this rank's slice
    digest: str  # sha256 of the files it was read from (AdapterFiles.digest)

    @property
    def rank(self) -> int:
        return self.settings.rank


def serving_settings(mode: Mode | str, tp: int, max_lora_rank: int) -> LoRASettings:
    """The model's slot capacity: all seven projections at the largest rank (rounded up to a multiple of TP)."""
    rank = -(-max_lora_rank // tp) * tp
    return LoRASettings(rank=rank, alpha=float(rank), mode=mode, targets=ALL_TARGETS)


def load_host_adapter(
    name: str,
    path: str | Path,
    hf_config: dict,
    tp: int,
    tp_rank: int,
    mode: Mode | str,
    max_lora_rank: int,
    expected_digest: str | None = None,
) -> HostAdapter:
    """An adapter in the server's mode, this rank's slices kept; ValueError / FileNotFoundError if it is unfit, and
    AdapterChangedError if its files are not those of `expected_digest` (the digest it was registered with)."""
    files = AdapterFiles.read(path)
    if expected_digest is not None and files.digest != expected_digest:
        raise AdapterChangedError(path, expected_digest, files.digest)
    ckpt = read_adapter(files, hf_config, tp, mode)
    if ckpt.settings.rank > serving_settings(mode, tp, max_lora_rank).rank:
        raise ValueError(
            f"adapter {name!r} ({path}) has rank {ckpt.settings.rank} > --max-lora-rank {max_lora_rank}"
        )
    shards = ckpt.rank_state(tp_rank)
    for key, tensor in shards.items():  # a NaN factor would poison its requests' KV blocks, reused by others later
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"adapter {name!r} ({path}): {key} holds non-finite values (NaN or inf)")
    return HostAdapter(name, str(path), ckpt.settings, ckpt.plans(), shards, files.digest)


@torch.no_grad()
def write_slot(layers: dict, slot: int, adapter: HostAdapter | None) -> None:
    """Put an adapter's slices into `slot` of every LoRA layer (None: clear the slot everywhere); `layers`:
    megatron_bdlora.model.lora_layers(model), walked once by the caller (3 ms of a 19 ms SmolLM2 write)."""
    for (layer, proj), (module, name) in layers.items():
        lora = module.lora[name]
        if adapter is None or proj not in adapter.plans:
            lora.clear_slot(slot)
            continue
        a = adapter.shards[factor_key(layer, proj, "A")]
        b = adapter.shards[factor_key(layer, proj, "B")]
        try:
            lora.load_slot(slot, a, b, adapter.plans[proj], adapter.settings.scaling)
        except ValueError as err:
            raise ValueError(f"adapter {adapter.name!r}, layer {layer} {proj}: {err}") from None
