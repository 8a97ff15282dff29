"""LoRA settings shared by layers, the model builder, checkpoints and training configs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_bdlora.sharding import Mode, parse_mode

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COLUMN_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # block-diagonal B in BD mode
ROW_TARGETS = ("o_proj", "down_proj")  # block-diagonal A in BD mode


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
