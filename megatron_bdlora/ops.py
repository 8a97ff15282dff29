"""Multi-adapter LoRA: add the LoRA outputs of many adapters to one batch of tokens.

A LoRA branch is a *shrink* (x -> rank space, by A) and an *expand* (rank space -> out, by B), with the
sharding plan's collective (if any) between them; this module knows nothing about TP. Factors live in
stacks of adapter slots sized for the largest adapter ([slots, rows, cols]); each slot has its own view
(rows, cols, blocks) of its stack entry, so adapters of different ranks and block counts share one batch
and a small adapter does only its own work (its slice of the stack, never padded zeros).

Serving sorts the batch's tokens by slot once per step (`SlotBatch`, device tensors built without a host
sync); every layer reuses it. The shrink reads the tokens in slot order and writes the rank space in that
order; the expand adds each slot's output straight into the layer's output (fused layout included, see
`OutputLayout`), leaving tokens without an adapter untouched. Two backends share these signatures: the
Triton kernels (`megatron_bdlora.kernels`, CUDA tensors) and torch (CPU); `use_backend` forces one.
Training uses one slot and no grouping (`matmul_packed`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch


GATHER_TOKENS = 64  # torch path: up to this many tokens, adjacent same-shape slots run as one matmul with gathered factors
BACKENDS = ("auto", "torch", "triton")
_backend = "auto"  # set_backend(); the environment variable MEGATRON_BDLORA_LORA_BACKEND sets it at import


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
    their device table of it.
    """

    def replace(self, slot: int, view: FactorView | None) -> "SlotViews":
        """A copy with one slot's view changed."""
        return SlotViews(view if s == slot else v for s, v in enumerate(self))

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[slots, 3] int32 (rows, cols, blocks) for the kernels; rows 0 = nothing for this slot."""
        key = ("table", str(device))
        if key not in self.__dict__:
            rows = [(v.rows, v.cols, v.blocks) if v is not None else (0, 0, 1) for v in self]
            self.__dict__[key] = torch.tensor(rows, dtype=torch.int32, device=device)
        return self.__dict__[key]


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
        return OutputLayout(width, width, 0)

    def view(self, out: torch.Tensor, width: int) -> torch.Tensor:
        """[n, D] output -> the [n, groups, group_width] strided view of the columns this layout addresses."""
        groups = width // self.group_width
        return out.as_strided(
            (out.shape[0], groups, self.group_width),
            (out.stride(0), self.group_stride * out.stride(1), out.stride(1)),
            out.storage_offset() + self.offset * out.stride(1),
        )


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
        targets = (buffers.order[:n], buffers.slot_starts, buffers.slot_counts, buffers.active_slots, buffers.num_active)
        for dst, src in zip(targets, fields):
            dst.copy_(src)
        return SlotBatch(n, *targets)

    @staticmethod
    def buffers(max_tokens: int, num_slots: int, device: torch.device | str) -> "SlotBatch":
        """Empty fixed-size buffers for `from_slot_ids(..., buffers=)`."""
        z = lambda k: torch.zeros(k, dtype=torch.int32, device=device)  # noqa: E731
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

    def _host_order(self) -> torch.Tensor | None:
        """The sort order, or None when it is the identity (tokens already grouped: no gather/scatter)."""
        if "order" not in self._cache:
            order = self.order.long()
            identity = bool((order.cpu() == torch.arange(self.num_tokens)).all())
            self._cache["order"] = None if identity else order
        return self._cache["order"]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, d] -> [tokens, d] in slot order (cached for the last x: fused layers shrink it per projection)."""
        order = self._host_order()
        if order is None:
            return x
        last = self._cache.get("gathered")
        if last is None or last[0] is not x:
            self._cache["gathered"] = (x, x.index_select(0, order))
        return self._cache["gathered"][1]

    def plan(self, views: Sequence[FactorView | None], width: int) -> tuple[bool, list[tuple]]:
        """How the torch path runs one factor stack this step (cached per views instance).

        Returns (whether one group fills every row and column of the output, groups); a group is
        (view, first row, end row, slot of each row or None for one matmul per segment, its segments).
        """
        key = (id(views), width)
        if key not in self._cache:
            runs: list[tuple[FactorView, list[tuple[int, int, int]]]] = []
            for seg in self.segments:
                v = views[seg[0]]
                if v is None:
                    continue
                if runs and runs[-1][0] == v and runs[-1][1][-1][2] == seg[1]:
                    runs[-1][1].append(seg)
                else:
                    runs.append((v, [seg]))
            groups = []
            for v, segs in runs:
                lo, hi = segs[0][1], segs[-1][2]
                gather = len(segs) > 1 and hi - lo <= GATHER_TOKENS
                slots = [slot for slot, s_lo, s_hi in segs for _ in range(s_hi - s_lo)] if gather else None
                slots = None if slots is None else torch.tensor(slots, dtype=torch.long, device=self.order.device)
                groups.append((v, lo, hi, slots, segs))
            fills_all = len(groups) == 1 and groups[0][1:3] == (0, self.num_tokens) and groups[0][0].rows == width
            fills_all = fills_all and (groups[0][3] is not None or len(groups[0][4]) == 1)
            self._cache[key] = (fills_all, groups)
        return self._cache[key]


def set_backend(name: str) -> None:
    """Which implementation runs the multi-adapter ops: auto (Triton on CUDA tensors, torch otherwise),
    torch, or triton (on CPU tensors only inside Triton's interpreter, TRITON_INTERPRET=1)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"LoRA ops backend {name!r}: expected one of {BACKENDS}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a block (tests, benchmarks)."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _triton_for(x: torch.Tensor) -> bool:
    if _backend == "auto":
        return x.is_cuda
    if _backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton LoRA backend on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return _backend == "triton"


def matmul_packed(x: torch.Tensor, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """x @ W.T with W packed block-diagonal [out, in / blocks] (block j maps input chunk j to output chunk j)."""
    if blocks == 1:
        return torch.matmul(x, weight.t())
    out_dim, block_in = weight.shape
    xb = x.reshape(*x.shape[:-1], blocks, block_in)  # [..., k, in/k]
    wb = weight.reshape(blocks, out_dim // blocks, block_in)  # [k, out/k, in/k]
    yb = torch.einsum("...ki,koi->...ko", xb, wb)  # [..., k, out/k]
    return yb.reshape(*x.shape[:-1], out_dim)


def lora_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    views: Sequence[FactorView | None],
    batch: SlotBatch,
    graph: GraphLaunch | None = None,
) -> torch.Tensor:
    """Rank space of every token, in slot order: x [n, in] (token order) -> z [n, R], R = weight.shape[1].

    weight: [slots, R, C]; slot s uses weight[s, :rows, :cols] with its block count. Rows of tokens without an
    adapter and columns beyond a slot's rows are zero (so an all-reduce or all-gather of the whole z is exact).
    graph: size the Triton launch for CUDA-graph capture (the torch path has nothing to capture-proof).
    """
    views = views if isinstance(views, SlotViews) else SlotViews(views)
    if _triton_for(x):
        from megatron_bdlora import kernels

        return kernels.shrink(x, weight, views, batch, graph=graph)
    return _grouped_matmul(batch.gather(x), weight, views, batch, None, lambda v, xs: xs[:, : v.in_width])


def lora_expand(
    z: torch.Tensor,
    weight: torch.Tensor,
    views: Sequence[FactorView | None],
    scalings: torch.Tensor,
    batch: SlotBatch,
    out: torch.Tensor,
    layout: OutputLayout | None = None,
    in_chunks: int = 1,
    graph: GraphLaunch | None = None,
) -> torch.Tensor:
    """out[token, layout(c)] += scaling_s * (B_s z_token)[c] for every token with an adapter; returns out.

    z: [n, in_chunks * R] in slot order (the shrink's, after the plan's collective); weight: [slots, O, R'];
    scalings: [slots]; out: [n, D] in token order, tokens without an adapter left bit-identical. in_chunks > 1:
    z is an all-gather of in_chunks ranks' [n, R] pieces; a slot's rank space is the first in_width / in_chunks
    columns of every piece (S-LoRA column layers).
    """
    views = views if isinstance(views, SlotViews) else SlotViews(views)
    layout = layout or OutputLayout.contiguous(weight.shape[1])
    if _triton_for(z):
        from megatron_bdlora import kernels

        return kernels.expand(z, weight, views, scalings, batch, out, layout, in_chunks, graph=graph)
    n, piece = z.shape[0], z.shape[1] // in_chunks

    def rank_space(v: FactorView, zs: torch.Tensor) -> torch.Tensor:  # [n, in_width]
        if in_chunks == 1:
            return zs[:, : v.in_width]
        return zs.reshape(n, in_chunks, piece)[:, :, : v.in_width // in_chunks].reshape(n, v.in_width)

    y = _grouped_matmul(z, weight, views, batch, scalings, rank_space)  # [n, O] in slot order
    lo = batch.segments[0][1] if batch.segments else n  # tokens before lo have no adapter
    target = layout.view(out, y.shape[1])  # [n, groups, group_width]
    y = y[lo:].reshape(n - lo, *target.shape[1:]).to(out.dtype)
    order = batch._host_order()
    if order is None:
        target[lo:] += y
    else:
        target.index_add_(0, order[lo:], y)
    return out


def _grouped_matmul(x, weight, views, batch, scalings, inputs_for) -> torch.Tensor:
    """out[rows of slot s, :rows_s] = inputs_s @ W_s.T (* scaling_s) over the sorted rows, zeros elsewhere.

    Decode-sized batches: adjacent slots with the same view (same rank and blocks: typical for a fleet of
    adapters) run as one batched matmul with each token's own factor gathered (BGMV, as Punica / S-LoRA do for
    decode); longer segments (prefill) run one matmul per slot.
    """
    n, width = x.shape[0], weight.shape[1]
    fills_all, groups = batch.plan(views, width)
    out = None if fills_all else x.new_zeros(n, width)  # [n, R or O]
    for v, lo, hi, slots, segs in groups:
        inputs = inputs_for(v, x)  # [n, in_width]
        if slots is not None:  # gathered factors, one matmul for the group
            xs = inputs[lo:hi]
            if scalings is not None:
                xs = xs * scalings.index_select(0, slots).to(xs.dtype)[:, None]
            wt = weight.index_select(0, slots)[:, : v.rows, : v.cols]  # [t, rows, cols]
            if v.blocks == 1:
                y = torch.bmm(xs[:, None, :], wt.transpose(1, 2))  # [t, 1, rows]
            else:
                xb, wb = xs.reshape(hi - lo, v.blocks, v.cols), wt.reshape(hi - lo, v.blocks, v.rows // v.blocks, v.cols)
                y = torch.einsum("tki,tkoi->tko", xb, wb)  # [t, k, rows/k]
            y = y.reshape(hi - lo, v.rows)
            if out is None:
                return y
            out[lo:hi, : v.rows] = y
            continue
        for slot, s_lo, s_hi in segs:
            xs = inputs[s_lo:s_hi] if scalings is None else inputs[s_lo:s_hi] * scalings[slot].to(inputs.dtype)
            y = matmul_packed(xs, weight[slot, : v.rows, : v.cols], v.blocks)
            if out is None:
                return y  # the only segment, covering every row and column
            out[s_lo:s_hi, : v.rows] = y
    return x.new_zeros(n, width) if out is None else out


set_backend(os.environ.get("MEGATRON_BDLORA_LORA_BACKEND", "auto"))
