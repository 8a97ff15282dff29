"""The per-step metadata of multi-adapter LoRA, shared by the ops (`megatron_bdlora.ops`) and the kernels.

Factors live in stacks of adapter slots sized for the largest adapter ([slots, rows, cols]); `FactorView` is the
part of a slot's entry one adapter uses and `SlotViews` those of every slot of one stack. `SlotBatch` is a step's
tokens sorted by slot (built once, reused by every layer), `OutputLayout` where an expand's columns land in a
fused output, `GraphLaunch` what a launch captured in a CUDA graph reads instead of today's views. Plain data
and torch only: both `ops` and `kernels` import it, it imports neither.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class FactorView:
    """The part of a slot's [rows, cols] stack entry an adapter uses, and its block count (packed BD)."""

    rows: int
    cols: int
    blocks: int = 1

    @property
    def in_width(self) -> int:
        """Input features the view consumes: cols per block times blocks."""
        return self.cols * self.blocks


class SlotViews(tuple):
    """Each slot's view of one factor stack (None: the slot holds nothing for it).

    Immutable and replaced on every load/unload, so a step can cache its plan per instance and the kernels
    their device table and grid of it.
    """

    def __new__(cls, views: Iterable[FactorView | None] = ()) -> "SlotViews":
        self = super().__new__(cls, views)
        self._cache: dict[Hashable, Any] = {}  # the device tables and grid sizes of these views
        return self

    def replace(self, slot: int, view: FactorView | None) -> "SlotViews":
        """A copy with one slot's view changed."""
        return SlotViews(view if s == slot else v for s, v in enumerate(self))

    @staticmethod
    def interleaved(slices: Sequence["SlotViews"]) -> "SlotViews":
        """Each slot's view of a stack packing the A factors of P sub-projections row-interleaved (rank row j of
        slice p at row j * P + p, see ops.lora_shrink_packed): the rank rows of all slices as one dense matrix.

        An adapter has one view of A per layer, so the slices a slot holds agree; a slice it does not hold has zero
        rows there (cleared), computed and never read.
        """
        if len(slices) == 1:
            return slices[0]
        key = ("interleaved", tuple(map(id, slices[1:])))
        cached = slices[0]._cache.get(key)
        if cached is not None and all(a is b for a, b in zip(cached[0], slices[1:])):
            return cached[1]
        packed = []
        for slot, per_slice in enumerate(zip(*slices)):
            held = {v for v in per_slice if v is not None}
            if len(held) > 1 or any(v.blocks != 1 for v in held):
                raise ValueError(f"slot {slot}: packed A factors need one dense view for all slices, got {held}")
            v = held.pop() if held else None
            packed.append(None if v is None else FactorView(v.rows * len(slices), v.cols))
        slices[0]._cache[key] = (tuple(slices[1:]), SlotViews(packed))
        return slices[0]._cache[key][1]

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[slots, 3] int32 (rows, cols, blocks) for the kernels; rows 0 = nothing for this slot."""
        key = ("table", str(device))
        if key not in self._cache:
            rows = [(v.rows, v.cols, v.blocks) if v is not None else (0, 0, 1) for v in self]
            self._cache[key] = torch.tensor(rows, dtype=torch.int32, device=device)
        return self._cache[key]

    def output_tiles(self, block_n: int) -> int:
        """Output tiles the widest slot needs (the kernels' grid): its blocks times the `block_n`-row tiles of one
        block's rows."""
        key = ("tiles", block_n)
        if key not in self._cache:
            tiles = [v.blocks * -(-(v.rows // v.blocks) // block_n) for v in self if v is not None]  # ceil division
            self._cache[key] = max(tiles, default=0)
        return self._cache[key]


@dataclass(frozen=True)
class GraphLaunch:
    """What a kernel launch captured in a CUDA graph must not read from today's views, for one factor stack.

    A graph replays the launch arguments of its capture: the grid, the tile sizes and the address of the slot
    table. Adapters are loaded after capture, so the launch is sized for the stack's capacity (any view of at
    most `max_blocks` blocks fits) and reads `table`, a [slots, 3] buffer that loads rewrite in place.
    """

    table: torch.Tensor
    max_blocks: int


@dataclass(frozen=True)
class OutputLayout:
    """Where an expand's output column c lands in the layer's output row:
    (c // group_width) * group_stride + offset + c % group_width.

    A fused layer interleaves its sub-projections per group ([q | k | v] per query group, [gate | up] per rank),
    and a row S-LoRA rank writes its d_out/tp slice at its own offset; a plain layer is one group.
    """

    group_width: int
    group_stride: int
    offset: int = 0

    @staticmethod
    def contiguous(width: int) -> "OutputLayout":
        """A plain layer's layout: one group, the expand's columns are the output's."""
        return OutputLayout(width, width, 0)

    def columns(self, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[width] long: the output column of each of an expand's `width` columns."""
        c = torch.arange(width, device=device)
        return (c // self.group_width) * self.group_stride + self.offset + c % self.group_width

    def view(self, out: torch.Tensor, width: int) -> torch.Tensor:
        """[n, D] output -> the [n, groups, group_width] strided view of the columns this layout addresses."""
        groups = width // self.group_width
        return out.as_strided(
            (out.shape[0], groups, self.group_width),
            (out.stride(0), self.group_stride * out.stride(1), out.stride(1)),
            out.storage_offset() + self.offset * out.stride(1),
        )


@dataclass(frozen=True)
class ExpandSlice:
    """One sub-projection of a packed expand: its B stack, the slots' views of it, their scalings, its output
    columns, and (CUDA graphs) its fixed-address launch."""

    weight: torch.Tensor  # [slots, O, R']
    views: SlotViews
    scalings: torch.Tensor  # [slots]
    layout: OutputLayout
    graph: GraphLaunch | None = None


@dataclass(frozen=True)
class PackedSlotFactors:
    """One slot's factors of a fused layer reordered for oneDNN (frozen_linear.pack_weight), for long CPU steps:
    a, its A rows of every sub-projection row-interleaved [P * r, C]; b, each sub-projection's B [O, r] (None where
    the slot lacks it)."""

    a: torch.Tensor
    b: tuple[torch.Tensor | None, ...]


@dataclass(frozen=True)
class DenseFactors:
    """A layer's adapters in the slots a step uses, as two dense matrices (the torch path of decode-sized steps).

    a_t [in, rows]: every used slot's A rows of every sub-projection, sub-projection by sub-projection
    (block-diagonal factors made dense). parts: one per sub-projection, (first row, end row, output layout, B rows
    scaled [rows, width]) - the B rows of those rows and the fused output's columns they write. row_slots: the slot
    of each row.
    """

    a_t: torch.Tensor
    parts: tuple[tuple[int, int, OutputLayout, torch.Tensor], ...]
    row_slots: tuple[int, ...]
    onednn: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None  # a_t.T and each part's B.T packed for oneDNN


@dataclass(frozen=True)
class SlotBatch:
    """The tokens of one forward step sorted by adapter slot (built once, reused by every LoRA layer).

    Device tensors, fixed-size per slot capacity and built without a host sync (CUDA-graph safe):
    order [n]: token positions sorted by slot (stable; tokens without an adapter, slot -1, first);
    slot_starts / slot_counts [slots]: each slot's range in that order; active_slots [slots]: the slots with
    tokens, then -1; num_active [1]. The torch path also reads `segments`, the host copy (one sync per step,
    none when the slot ids were on the host).
    """

    num_tokens: int
    order: torch.Tensor
    slot_starts: torch.Tensor
    slot_counts: torch.Tensor
    active_slots: torch.Tensor
    num_active: torch.Tensor
    _cache: dict = field(default_factory=dict, compare=False, repr=False)  # host forms and per-step plans

    @staticmethod
    def from_slot_ids(
        slot_ids: torch.Tensor, num_slots: int | None = None, buffers: "SlotBatch | None" = None
    ) -> "SlotBatch":
        """Sort tokens by slot id ([tokens], -1 = no adapter) on the ids' device.

        num_slots: the slot capacity (default: from the ids, which syncs). buffers: a SlotBatch of at least this
        many tokens and the same slots whose tensors are refilled in place (fixed addresses for CUDA graphs).
        """
        ids = slot_ids.reshape(-1).to(torch.int64)
        n = ids.numel()
        if num_slots is None:
            num_slots = int(ids.max().item()) + 1 if n else 0
        _, order = torch.sort(ids, stable=True)
        counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=ids.device)
        counts.scatter_add_(0, ids + 1, torch.ones_like(ids))  # bucket 0: no adapter
        starts = counts.cumsum(0)[:-1]  # slot s starts after buckets 0..s
        slot_counts = counts[1:]
        idle = (slot_counts == 0).to(torch.int8)
        _, by_activity = torch.sort(idle, stable=True)
        active = torch.where(idle[by_activity].bool(), -1, by_activity)
        fields = (order, starts, slot_counts, active, (1 - idle).sum().reshape(1))
        if buffers is None:
            return SlotBatch(n, *(t.to(torch.int32) for t in fields))
        if buffers.order.numel() < n or buffers.slot_counts.numel() != num_slots:
            raise ValueError(f"slot buffers hold {buffers.order.numel()} tokens / {buffers.slot_counts.numel()} "
                             f"slots, step has {n} tokens / {num_slots} slots")
        b = buffers
        targets = (b.order[:n], b.slot_starts, b.slot_counts, b.active_slots, b.num_active)
        for dst, src in zip(targets, fields):
            dst.copy_(src)
        return SlotBatch(n, *targets)

    @staticmethod
    def buffers(max_tokens: int, num_slots: int, device: torch.device | str) -> "SlotBatch":
        """Empty fixed-size buffers for `from_slot_ids(..., buffers=)`."""
        z = functools.partial(torch.zeros, dtype=torch.int32, device=device)
        return SlotBatch(0, z(max_tokens), z(num_slots), z(num_slots), z(num_slots), z(1))

    @property
    def segments(self) -> tuple[tuple[int, int, int], ...]:
        """(slot, start, stop) ranges of the sorted order, one per slot with tokens (host)."""
        if "segments" not in self._cache:
            starts, counts = self.slot_starts.tolist(), self.slot_counts.tolist()
            segs = sorted((start, slot, count) for slot, (start, count) in enumerate(zip(starts, counts)) if count)
            self._cache["segments"] = tuple((slot, start, start + count) for start, slot, count in segs)
        return self._cache["segments"]

    @property
    def any_adapter(self) -> bool:
        """Whether any token may use an adapter (else LoRA layers skip the branch this step). On a GPU always
        True, so the forward never syncs (a base-only step's kernels exit at once)."""
        return self.order.is_cuda or bool(self.segments)

    @property
    def used_slots(self) -> tuple[int, ...]:
        """The slots with tokens this step, ascending (host)."""
        if "used_slots" not in self._cache:
            self._cache["used_slots"] = tuple(sorted(slot for slot, _, _ in self.segments))
        return self._cache["used_slots"]

    @property
    def first_adapter_row(self) -> int:
        """Rows of the slot order before this one have no adapter (host; the torch path computes only the rest)."""
        return self.segments[0][1] if self.segments else self.num_tokens

    def host_order(self) -> torch.Tensor | None:
        """The sort order, or None when it is the identity (tokens already grouped: no gather/scatter)."""
        if "order" not in self._cache:
            order = self.order.long()
            identity = bool((order.cpu() == torch.arange(self.num_tokens)).all())
            self._cache["order"] = None if identity else order
        return self._cache["order"]

    def token_slots(self) -> torch.Tensor:
        """[tokens] long: each token's slot in token order (-1: none), from the segments (host; once per step)."""
        if "token_slots" not in self._cache:
            slots = torch.full((self.num_tokens,), -1, dtype=torch.long, device=self.order.device)
            order = self.order.long()
            for slot, start, stop in self.segments:
                slots[order[start:stop]] = slot
            self._cache["token_slots"] = slots
        return self._cache["token_slots"]

    @property
    def token_runs(self) -> tuple[tuple[int, int, int], ...]:
        """(slot, start, stop) ranges of adjacent tokens of one slot in token order (a request's prompt), tokens
        without an adapter left out (host, once per step): what a long collective-free step computes in place."""
        if "token_runs" not in self._cache:
            runs: list[list[int]] = []
            for t, slot in enumerate(self.token_slots().tolist()):
                if runs and runs[-1][0] == slot and runs[-1][2] == t:
                    runs[-1][2] = t + 1
                elif slot >= 0:
                    runs.append([slot, t, t + 1])
            self._cache["token_runs"] = tuple(map(tuple, runs))
        return self._cache["token_runs"]

    def host_scalings(self, scalings: torch.Tensor) -> list[float]:
        """The slots' scalings on the host (cached for the step: loads happen between steps)."""
        key = ("host_scalings", id(scalings))
        if key not in self._cache:
            self._cache[key] = (scalings, scalings.tolist())  # (holds the tensor so its id is not reused)
        return self._cache[key][1]

    def slot_mask(self, row_slots: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """[tokens, rows] 1 where row r belongs to the token's own slot (row_slots[r]), else 0 (cached per layout)."""
        key = ("mask", row_slots, dtype)
        if key not in self._cache:
            rows = torch.tensor(row_slots, dtype=torch.long, device=self.order.device)
            self._cache[key] = (self.token_slots()[:, None] == rows[None, :]).to(dtype)
        return self._cache[key]

    def adapter_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, d] -> the [rows with an adapter, d] of the slot order (a view when tokens are already grouped)."""
        order, lo = self.host_order(), self.first_adapter_row
        return x[lo:] if order is None else x.index_select(0, order[lo:])

    def add_adapter_rows(self, out: torch.Tensor, y: torch.Tensor, start: int = 0) -> None:
        """out[token of adapter row start + i] += y[i] (rows counted from the first with an adapter; out in token
        order, added in place)."""
        lo = self.first_adapter_row + start
        order = self.host_order()
        if order is None:
            out[lo : lo + y.shape[0]] += y
        else:  # (index_put_ accumulates into strided outputs several times faster than index_add_ on CPU)
            out.index_put_((order[lo : lo + y.shape[0]],), y, accumulate=True)

    def row_scalings(self, scalings: torch.Tensor, run: "Run") -> torch.Tensor:
        """[rows of the run, 1]: each row's slot scaling (cached for the step: loads happen between steps)."""
        key = ("scalings", id(scalings), id(run))
        if key not in self._cache:
            self._cache[key] = (scalings, run, scalings.index_select(0, run.row_slots)[:, None])  # (holds the ids)
        return self._cache[key][2]

    def runs(self, views: Sequence[FactorView | None], gather_tokens: int) -> tuple["Run", ...]:
        """How the torch path runs one factor stack this step (cached per views instance): adjacent segments whose
        slots hold the same view form one run; a run of at most `gather_tokens` rows (decode) is one grouped matmul,
        a longer one (prefill) one matmul per segment."""
        key = (id(views), gather_tokens)
        if key not in self._cache:
            grouped: list[list[tuple[int, int, int]]] = []
            for seg in self.segments:
                v = views[seg[0]]
                if v is None:
                    continue
                if grouped and views[grouped[-1][-1][0]] == v and grouped[-1][-1][2] == seg[1]:
                    grouped[-1].append(seg)
                else:
                    grouped.append([seg])
            base = self.first_adapter_row
            device = self.order.device
            runs = tuple(Run.build(views[s[0][0]], s, base, gather_tokens, device) for s in grouped)
            self._cache[key] = (views, runs)  # (holding views keeps its id from being reused while cached)
        return self._cache[key][1]


@dataclass(frozen=True)
class Run:
    """Adjacent segments of the slot order whose slots hold one view: computed together.

    Rows are counted from the batch's first row with an adapter (the torch path computes only those).
    """

    view: FactorView
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, stop), rows relative to the first adapter row
    row_slots: torch.Tensor  # [rows] long: each row's slot (per-row scalings)
    offsets: torch.Tensor | None  # [last - first + 1] int32 end row of each slot first..last (relative to lo), for
    # one grouped matmul over the slot range (idle slots between are empty groups); None: a matmul per segment

    @staticmethod
    def build(
        view: FactorView, segments: list[tuple[int, int, int]], base: int, gather_tokens: int, device: torch.device
    ) -> "Run":
        """A run of segments (rows of the whole slot order), re-based to the first adapter row `base`."""
        segs = tuple((slot, start - base, stop - base) for slot, start, stop in segments)
        lo, first, last = segs[0][1], segs[0][0], segs[-1][0]
        row_slots = torch.tensor([slot for slot, start, stop in segs for _ in range(stop - start)], device=device)
        offsets = None
        if len(segs) > 1 and segs[-1][2] - lo <= gather_tokens:
            ends = dict((slot, stop - lo) for slot, _, stop in segs)
            running, offs = 0, []
            for slot in range(first, last + 1):
                running = ends.get(slot, running)
                offs.append(running)
            offsets = torch.tensor(offs, dtype=torch.int32, device=device)
        return Run(view, segs, row_slots, offsets)

    @property
    def lo(self) -> int:
        return self.segments[0][1]

    @property
    def hi(self) -> int:
        return self.segments[-1][2]

    @property
    def slots(self) -> slice:
        """The slot range the run's grouped matmul reads (first..last slot)."""
        return slice(self.segments[0][0], self.segments[-1][0] + 1)
