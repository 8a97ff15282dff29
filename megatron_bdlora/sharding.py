"""The sharding plan: which slice of each LoRA factor a TP rank holds, and which collective the branch needs.

Written once for (layer kind: column | row) x (mode: block_diagonal | slora | replicated); layers,
converters and adapter pools all ask a `ShardingPlan` for shapes and slices.

Conventions (PEFT's): y = W x + s * B (A x), A: (r, d_in), B: (d_out, r).
A factor's *stored* form is PEFT's on-disk layout: a block-diagonal factor is kept packed, shape
(out, in / nblocks), block j = rows j*out/nblocks .. (j+1)*out/nblocks, mapping input chunk j to output
chunk j; other factors are dense. Every rank holds a contiguous slice of the stored form along one dim
(or all of it), so sharding is a slice and unsharding a concatenation.

| kind   | mode           | A on rank i                 | B on rank i                 | collective on (tokens, r) |
|--------|----------------|-----------------------------|-----------------------------|---------------------------|
| column | block_diagonal | rows i (dense)              | rows i (packed, k blocks)   | none                      |
| row    | block_diagonal | rows i (packed, k blocks)   | cols i (dense)              | none (rides base reduce)  |
| column | slora          | rows i                      | rows i                      | all-gather                |
| row    | slora          | cols i                      | rows i (output slice i)     | all-reduce                |
| column | replicated     | all (grad all-reduced)      | rows i                      | none                      |
| row    | replicated     | cols i                      | all (grad all-reduced)      | none                      |
with k = nblocks / tp blocks per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class LayerKind(str, Enum):
    """Megatron's two TP linear layouts."""

    COLUMN = "column"  # input replicated, output sharded
    ROW = "row"  # input sharded, partial outputs all-reduced


class Mode(str, Enum):
    """How a LoRA adapter is sharded over TP ranks."""

    BLOCK_DIAGONAL = "block_diagonal"
    SLORA = "slora"
    REPLICATED = "replicated"


class Collective(str, Enum):
    """The collective a LoRA branch runs on its rank-r intermediate."""

    NONE = "none"
    ALL_GATHER = "all_gather"
    ALL_REDUCE = "all_reduce"


def parse_mode(mode: str | Mode) -> Mode:
    """Mode from its name; a clear ValueError for anything else."""
    try:
        return Mode(mode)
    except ValueError:
        raise ValueError(f"unknown LoRA mode {mode!r}; expected one of {[m.value for m in Mode]}") from None


@dataclass(frozen=True)
class FactorShard:
    """How one factor's stored form is laid out over TP ranks."""

    full_shape: tuple[int, int]
    split_dim: int | None  # dim of the stored form split into tp contiguous slices; None: replicated
    packed_blocks: int  # blocks in the stored form (nblocks for the block-diagonal factor, else 1)
    tp: int

    @property
    def local_shape(self) -> tuple[int, int]:
        shape = list(self.full_shape)
        if self.split_dim is not None:
            shape[self.split_dim] //= self.tp
        return (shape[0], shape[1])

    @property
    def local_blocks(self) -> int:
        """Blocks in this rank's slice (the block-diagonal factor is split along its block rows)."""
        return self.packed_blocks // self.tp if self.packed_blocks > 1 else 1

    @property
    def replicated(self) -> bool:
        return self.split_dim is None and self.tp > 1

    def shard(self, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        """This rank's slice of the stored form."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(f"factor has shape {tuple(full.shape)}, expected {self.full_shape}")
        if self.split_dim is None:
            return full.clone()
        return full.chunk(self.tp, dim=self.split_dim)[tp_rank].clone()

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The stored form from all ranks' slices (in TP-rank order)."""
        if len(shards) != self.tp:
            raise ValueError(f"got {len(shards)} shards, expected tp={self.tp}")
        for i, s in enumerate(shards):
            if tuple(s.shape) != self.local_shape:
                raise ValueError(f"shard {i} has shape {tuple(s.shape)}, expected {self.local_shape}")
        if self.split_dim is None:
            return shards[0].clone()
        return torch.cat(shards, dim=self.split_dim)


@dataclass(frozen=True)
class ShardingPlan:
    """Shapes, slices and communication of one adapted linear layer at one TP degree."""

    kind: LayerKind
    mode: Mode
    d_in: int
    d_out: int
    rank: int
    tp: int
    nblocks: int  # blocks of the block-diagonal factor (1 for slora / replicated)

    @staticmethod
    def build(
        kind: LayerKind | str,
        mode: Mode | str,
        d_in: int,
        d_out: int,
        rank: int,
        tp: int,
        nblocks: int | None = None,
    ) -> "ShardingPlan":
        """Validated plan; ValueError names the offending value. nblocks defaults to tp for BD."""
        kind = LayerKind(kind)
        mode = parse_mode(mode)
        if tp < 1 or rank < 1:
            raise ValueError(f"tp and rank must be positive, got tp={tp}, rank={rank}")
        sharded_dim, name = (d_out, "d_out") if kind is LayerKind.COLUMN else (d_in, "d_in")
        if sharded_dim % tp:
            raise ValueError(f"{kind.value} layer {name}={sharded_dim} is not divisible by tp={tp}")
        if mode is Mode.BLOCK_DIAGONAL:
            nblocks = tp if nblocks is None else nblocks
            if nblocks < 1 or nblocks % tp:
                raise ValueError(f"nblocks={nblocks} is not a multiple of tp={tp}")
            if rank % nblocks:
                raise ValueError(f"rank={rank} is not divisible by nblocks={nblocks}")
            if sharded_dim % nblocks:
                raise ValueError(f"{kind.value} layer {name}={sharded_dim} is not divisible by nblocks={nblocks}")
        else:
            nblocks = 1
            if mode is Mode.SLORA and rank % tp:
                raise ValueError(f"slora mode shards the rank: rank={rank} is not divisible by tp={tp}")
        return ShardingPlan(kind, mode, d_in, d_out, rank, tp, nblocks)

    @property
    def block_diagonal_factor(self) -> str | None:
        """'A' (row layers) or 'B' (column layers) in BD mode, else None."""
        if self.mode is not Mode.BLOCK_DIAGONAL:
            return None
        return "B" if self.kind is LayerKind.COLUMN else "A"

    @property
    def a(self) -> FactorShard:
        packed = self.nblocks if self.block_diagonal_factor == "A" else 1
        full = (self.rank, self.d_in // packed)
        split = {
            (LayerKind.COLUMN, Mode.BLOCK_DIAGONAL): 0,
            (LayerKind.ROW, Mode.BLOCK_DIAGONAL): 0,
            (LayerKind.COLUMN, Mode.SLORA): 0,
            (LayerKind.ROW, Mode.SLORA): 1,
            (LayerKind.COLUMN, Mode.REPLICATED): None,
            (LayerKind.ROW, Mode.REPLICATED): 1,
        }[(self.kind, self.mode)]
        return FactorShard(full, split, packed, self.tp)

    @property
    def b(self) -> FactorShard:
        packed = self.nblocks if self.block_diagonal_factor == "B" else 1
        full = (self.d_out, self.rank // packed)
        split = {
            (LayerKind.COLUMN, Mode.BLOCK_DIAGONAL): 0,
            (LayerKind.ROW, Mode.BLOCK_DIAGONAL): 1,
            (LayerKind.COLUMN, Mode.SLORA): 0,
            (LayerKind.ROW, Mode.SLORA): 0,
            (LayerKind.COLUMN, Mode.REPLICATED): 0,
            (LayerKind.ROW, Mode.REPLICATED): None,
        }[(self.kind, self.mode)]
        return FactorShard(full, split, packed, self.tp)

    @property
    def collective(self) -> Collective:
        """The collective on the (tokens, r) intermediate; only S-LoRA needs one."""
        if self.mode is not Mode.SLORA or self.tp == 1:
            return Collective.NONE
        return Collective.ALL_GATHER if self.kind is LayerKind.COLUMN else Collective.ALL_REDUCE

    @property
    def output_is_slice(self) -> bool:
        """Row S-LoRA produces only this rank's d_out/tp slice, added into that slice of the base partial."""
        return self.kind is LayerKind.ROW and self.mode is Mode.SLORA

    @property
    def merge_gather(self) -> str | None:
        """Factor to all-gather (along its split dim) before this rank can form its weight delta locally."""
        if self.mode is not Mode.SLORA or self.tp == 1:
            return None
        return "A" if self.kind is LayerKind.COLUMN else "B"

    def num_parameters(self) -> int:
        """Adapter parameters of this layer over all ranks (replicated factors counted once)."""
        return _numel(self.a.full_shape) + _numel(self.b.full_shape)

    def dense_delta(self, a_full: torch.Tensor, b_full: torch.Tensor) -> torch.Tensor:
        """The unscaled dense update B @ A (d_out, d_in) from the stored forms."""
        a = packed_to_block_diagonal(a_full, self.a.packed_blocks)
        b = packed_to_block_diagonal(b_full, self.b.packed_blocks)
        return b @ a


def _numel(shape: tuple[int, int]) -> int:
    return shape[0] * shape[1]


def packed_to_block_diagonal(packed: torch.Tensor, nblocks: int) -> torch.Tensor:
    """Dense (out, in) block-diagonal matrix from PEFT's packed (out, in / nblocks) layout."""
    if nblocks == 1:
        return packed
    if packed.shape[0] % nblocks:
        raise ValueError(f"packed factor has {packed.shape[0]} rows, not divisible by nblocks={nblocks}")
    return torch.block_diag(*packed.chunk(nblocks, dim=0))


def block_diagonal_to_packed(dense: torch.Tensor, nblocks: int, name: str = "factor") -> torch.Tensor:
    """PEFT's packed layout from a dense matrix; ValueError with the largest off-block entry if not block-diagonal."""
    if nblocks == 1:
        return dense
    out_dim, in_dim = dense.shape
    if out_dim % nblocks or in_dim % nblocks:
        raise ValueError(f"{name} shape {tuple(dense.shape)} is not divisible into nblocks={nblocks} blocks")
    bo, bi = out_dim // nblocks, in_dim // nblocks
    # [nblocks, bo, nblocks, bi]: entry [j, :, k, :] is block (j, k)
    grid = dense.reshape(nblocks, bo, nblocks, bi)
    diag = torch.arange(nblocks)
    packed = grid[diag, :, diag, :]  # [nblocks, bo, bi]
    off_block = grid.clone()
    off_block[diag, :, diag, :] = 0
    worst = off_block.abs().max().item()
    if worst != 0:
        raise ValueError(
            f"{name} is not block-diagonal with nblocks={nblocks}: largest off-block magnitude {worst:.6g} "
            f"(off-block norm {off_block.norm().item():.6g})"
        )
    return packed.reshape(out_dim, bi)


def repack_factor(stored: torch.Tensor, src_blocks: int, dst_blocks: int, name: str = "factor") -> torch.Tensor:
    """A stored factor re-laid out for another block count; exact, or ValueError with the largest off-block entry."""
    if src_blocks == dst_blocks:
        return stored
    return block_diagonal_to_packed(packed_to_block_diagonal(stored, src_blocks), dst_blocks, name).contiguous()
