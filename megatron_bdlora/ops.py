"""Multi-adapter LoRA: add the LoRA outputs of many adapters to one batch of tokens.

A LoRA branch is a *shrink* (x -> rank space, by A) and an *expand* (rank space -> out, by B), with the
sharding plan's collective (if any) between them; this module knows nothing about TP. Factors live in
stacks of adapter slots sized for the largest adapter ([slots, rows, cols]); each slot has its own view
(rows, cols, blocks) of its stack entry, so adapters of different ranks and block counts share one batch
and a small adapter does only its own work (its slice of the stack, never padded zeros).

A fused layer's sub-projections (q/k/v, gate/up) share their input: `lora_shrink_packed` runs all their A factors
in one call (stored row-interleaved, so a slot's rows of every slice are one matrix) and `lora_expand_packed` adds
every slice's B output into its columns of the fused output in one call; `lora_shrink` / `lora_expand` are the
one-slice case.

Serving sorts the batch's tokens by slot once per step (`SlotBatch`, device tensors built without a host
sync); every layer reuses it and the per-step plans it caches (runs of slots, per-row scalings). The shrink reads
the tokens in slot order and writes the rank space in that order; the expand adds each slot's output straight
into the layer's output in place (fused layout included, see `OutputLayout`), leaving tokens without an adapter
untouched. These step types live in `lora_batch`, below both backends. Two backends share these signatures: the
Triton kernels (`megatron_bdlora.kernels`, CUDA tensors) and torch (CPU); `use_backend` forces one. Training uses
one slot and no grouping (`matmul_packed`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from megatron_bdlora.frozen_linear import PACKED_DTYPES, pack_weight, packed_linear
from megatron_bdlora.lora_batch import (
    DenseFactors,
    ExpandSlice,
    FactorView,
    GraphLaunch,
    OutputLayout,
    PackedSlotFactors,
    Run,
    SlotBatch,
    SlotViews,
)
from megatron_bdlora.sharding import packed_to_block_diagonal

# torch path: up to this many tokens, adjacent slots with one view run as one grouped matmul (decode); longer runs
# (prefill) one matmul per slot, where the per-call cost is small next to the arithmetic
GATHER_TOKENS = 64
GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch's grouped_mm takes on CPU
# torch path: up to this many tokens, a layer whose plan has no collective runs its whole LoRA branch as two dense
# matmuls over the step's used slots (lora_dense_branch): ~3 ops per layer instead of ~10 per sub-projection
DENSE_TOKENS = 64
# longer steps: dense while used slots x mean tokens per run (prompt) stay within this (collective_free_branch)
DENSE_SLOT_TOKENS = 256
# dense branch: above this many tokens, its products run on oneDNN-packed factors where the layer packed them
ONEDNN_DENSE_TOKENS = 16
BACKENDS = ("auto", "torch", "triton")
_backend = "auto"  # set_backend(); the environment variable MEGATRON_BDLORA_LORA_BACKEND sets it at import


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
    return lora_shrink_packed(x, weight, [_slot_views(views)], batch, [graph])


def lora_shrink_packed(
    x: torch.Tensor,
    weight: torch.Tensor,
    slices: Sequence[SlotViews],
    batch: SlotBatch,
    graphs: Sequence[GraphLaunch | None] | None = None,
) -> torch.Tensor:
    """The shrink of P sub-projections sharing their input (fused q/k/v, gate/up) in one call: z [n, P * R].

    weight: [slots, R * P, C], the slices' A stacks row-interleaved (rank row j of slice p at row j * P + p), so a
    slot's rows of all slices are one dense matrix (one matmul; a rank-r slot computes its r * P rows only); z has
    the same interleaved columns. slices: each slice's views of its stack weight.unflatten(1, (R, P))[:, :, p].
    Zeros as lora_shrink; a slice a slot does not hold has zero rows (cleared slots), hence zero columns.
    """
    if _triton_for(x):
        # lazy: Triton loads on the first kernel launch only (never on CPU paths), after callers chose TRITON_INTERPRET
        from megatron_bdlora import kernels

        return kernels.shrink_packed(x, weight, slices, batch, graphs=graphs)
    n, width = x.shape[0], weight.shape[1]
    lo = batch.first_adapter_row
    runs = batch.runs(SlotViews.interleaved(slices), GATHER_TOKENS)
    xs = batch.adapter_rows(x) if runs else x[:0]  # [rows with an adapter, C] in slot order
    if len(runs) == 1 and lo == 0 and (runs[0].lo, runs[0].hi, runs[0].view.rows) == (0, n, width):
        return _grouped_matmul(xs, weight, runs[0])  # (every row and column: nothing to zero)
    z = x.new_zeros(n, width)  # [n, P * R], rank-sized
    for run in runs:
        z[lo + run.lo : lo + run.hi, : run.view.rows] = _grouped_matmul(xs[run.lo : run.hi], weight, run)
    return z


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
    layout = layout or OutputLayout.contiguous(weight.shape[1])
    return lora_expand_packed(z, [ExpandSlice(weight, _slot_views(views), scalings, layout, graph)], batch, out,
                              in_chunks)


def lora_expand_packed(
    z: torch.Tensor, slices: Sequence[ExpandSlice], batch: SlotBatch, out: torch.Tensor, in_chunks: int = 1
) -> torch.Tensor:
    """The expand of P sub-projections in one call, each added in place into its columns of one fused output.

    z: [n, in_chunks * P * R] from lora_shrink_packed (rank row j of slice p in column j * P + p of each piece);
    otherwise as lora_expand, slice by slice.
    """
    if _triton_for(z):
        from megatron_bdlora import kernels  # (see lora_shrink_packed)

        return kernels.expand_packed(z, slices, batch, out, in_chunks)
    zs = z[batch.first_adapter_row :]  # [rows with an adapter, in_chunks * P * R]
    for p, sl in enumerate(slices):
        for run in batch.runs(sl.views, GATHER_TOKENS):
            u = _rank_space(zs[run.lo : run.hi], run.view.in_width, p, len(slices), in_chunks)  # [t, in_width]
            u = u * batch.row_scalings(sl.scalings, run).to(u.dtype)
            y = _grouped_matmul(u, sl.weight, run).to(out.dtype)  # [t, O]
            target = sl.layout.view(out, y.shape[1])  # [n, groups, group_width]
            batch.add_adapter_rows(target, y.view(y.shape[0], *target.shape[1:]), run.lo)
    return out


def collective_free_branch(x: torch.Tensor, batch: SlotBatch) -> str | None:
    """How a collective-free layer runs this step's LoRA on the torch path: "dense" (lora_dense_branch) or
    "segments" (lora_segment_branch); None: the packed shrink and expand (Triton).

    Dense computes every used slot for every token (FLOPs x used slots) in a few large products; segments compute
    each run of tokens (a prompt) on its own slot only, in many thin products. Decode-sized steps go dense. A longer
    step goes dense while used slots x tokens per run stay small (short prompts over few adapters: measured on
    SmolLM2 prefill, 4 slots x ~32-token prompts, dense through oneDNN took 65 ms of LoRA against 110 ms for segments);
    long prompts or many adapters go to segments."""
    if _triton_for(x):
        return None
    if batch.num_tokens <= DENSE_TOKENS:
        return "dense"
    runs = len(batch.token_runs)
    return "dense" if runs and len(batch.used_slots) * batch.num_tokens <= DENSE_SLOT_TOKENS * runs else "segments"


def dense_factors(
    a_slices: Sequence[tuple[torch.Tensor, SlotViews]], expand: Sequence[ExpandSlice], slots: tuple[int, ...],
    in_width: int,
) -> DenseFactors:
    """The step's used slots of P sub-projections as DenseFactors: a_slices[p] = (A stack, views), expand[p] its B.

    A slot's rows are a rank-space: its A rows, and the B columns reading them, times its scaling; B rows land at
    their sub-projection's columns of the fused output (its OutputLayout).
    """
    a_rows, row_slots, parts = [a_slices[0][0].new_zeros(0, in_width)], [], []
    for (a_stack, a_views), sl in zip(a_slices, expand, strict=True):
        a_p, b_p = [], []
        for slot in slots:
            va, vb = a_views[slot], sl.views[slot]
            if va is None:
                continue
            a_p.append(packed_to_block_diagonal(a_stack[slot, : va.rows, : va.cols], va.blocks))  # [r, in]
            b = packed_to_block_diagonal(sl.weight[slot, : vb.rows, : vb.cols], vb.blocks)  # [D, r]
            b_p.append((b * sl.scalings[slot].to(b.dtype)).t())  # [r, D]
            row_slots += [slot] * va.rows
        if a_p:
            first = len(row_slots) - sum(a.shape[0] for a in a_p)
            a_rows += a_p
            parts.append((first, len(row_slots), sl.layout, torch.cat(b_p)))  # B: [rows of this sub-projection, D]
    return DenseFactors(torch.cat(a_rows).t().contiguous(), tuple(parts), tuple(row_slots))


def with_onednn_factors(factors: DenseFactors) -> DenseFactors:
    """The factors plus their oneDNN-packed forms (A as [rows, in], each part's B as [width, rows]), which
    lora_dense_branch uses for steps above ONEDNN_DENSE_TOKENS; unchanged where oneDNN cannot take them (empty
    matrices, dtypes torch already sends to oneDNN)."""
    weights = [factors.a_t.t()] + [b.t() for _, _, _, b in factors.parts]
    if factors.a_t.dtype not in PACKED_DTYPES or not all(w.numel() for w in weights):
        return factors
    packed = [pack_weight(w) for w in weights]
    return replace(factors, onednn=(packed[0], tuple(packed[1:])))


def onednn_slot_factors(
    a_packed: torch.Tensor, a_slices: Sequence[SlotViews], expand: Sequence[ExpandSlice], slot: int
) -> PackedSlotFactors | None:
    """One slot's factors packed for oneDNN, for lora_segment_branch; None for a slot with several blocks per rank
    (the block-diagonal einsum instead), an empty slot, or dtypes torch already sends to oneDNN."""
    va = SlotViews.interleaved(a_slices)[slot]
    vbs = [sl.views[slot] for sl in expand]
    if va is None or va.blocks > 1 or any(vb is not None and vb.blocks > 1 for vb in vbs):
        return None
    if a_packed.dtype not in PACKED_DTYPES:
        return None
    return PackedSlotFactors(
        pack_weight(a_packed[slot, : va.rows, : va.cols]),  # [P * r, C]
        tuple(None if vb is None else pack_weight(sl.weight[slot, : vb.rows, : vb.cols])  # [O, r]
              for sl, vb in zip(expand, vbs, strict=True)),
    )


def lora_dense_branch(x: torch.Tensor, out: torch.Tensor, factors: DenseFactors, batch: SlotBatch) -> torch.Tensor:
    """out += ((x A^T) * M) B in place, M the [tokens, rows] mask of each token's own slot: every token gets its own
    adapter's output (tokens without one get exact zeros), in token order, with no gather or scatter.

    One addmm per sub-projection of contiguous output columns; an interleaved one (q/k/v per query group) is a
    matmul added into its strided columns, so no B is padded to the fused width (at decode sizes the branch costs
    the bytes of the factors it reads, and zero padding would triple q/k/v's)."""
    packed = factors.onednn if x.shape[0] > ONEDNN_DENSE_TOKENS else None
    z = torch.mm(x, factors.a_t) if packed is None else packed_linear(x, packed[0])  # [n, rows]
    z.mul_(batch.slot_mask(factors.row_slots, x.dtype))
    for p, (r0, r1, layout, b) in enumerate(factors.parts):
        width = b.shape[1]
        if layout.group_width == width:  # one group: contiguous columns
            target = out[:, layout.offset : layout.offset + width]
            if packed is None:
                target.addmm_(z[:, r0:r1], b)
                continue
        else:
            target = layout.view(out, width)  # [n, groups, group_width], strided
        y = torch.mm(z[:, r0:r1], b) if packed is None else packed_linear(z[:, r0:r1], packed[1][p])
        target.add_(y.view(target.shape))
    return out


def lora_segment_branch(
    x: torch.Tensor, out: torch.Tensor, a_packed: torch.Tensor, a_slices: Sequence[SlotViews],
    expand: Sequence[ExpandSlice], batch: SlotBatch,
    onednn: Callable[[int], PackedSlotFactors | None] | None = None,
) -> torch.Tensor:
    """out += every token's own adapter output in place, for a long step (prefill) of a collective-free layer.

    A prompt's tokens are adjacent and share a slot (SlotBatch.token_runs): per run, one shrink of all P
    sub-projections (a_packed as in lora_shrink_packed) and one addmm per sub-projection into the run's rows of
    the fused output. No gather, scatter, zero fill or output-sized buffer: the rank space is the only intermediate,
    so the branch costs its FLOPs. Tokens without an adapter are left bit-identical. onednn(slot): the slot's
    factors packed for oneDNN (several times MKL's rate at these sizes on our CPUs), None to use torch's matmul.
    """
    a_views, slices = SlotViews.interleaved(a_slices), len(expand)
    for slot, lo, hi in batch.token_runs:
        va = a_views[slot]
        if va is None:
            continue
        packed = onednn(slot) if onednn is not None else None
        x_run = x[lo:hi, : va.in_width]
        z = packed_linear(x_run, packed.a) if packed else matmul_packed(x_run, a_packed[slot, : va.rows, : va.cols],
                                                                          va.blocks)  # [t, P * r]
        rows = out[lo:hi]
        for p, sl in enumerate(expand):
            vb = sl.views[slot]
            if vb is None:
                continue
            u = _rank_space(z, vb.in_width, p, slices, 1)  # [t, r], a view
            scale, layout = batch.host_scalings(sl.scalings)[slot], sl.layout
            contiguous = vb.blocks == 1 and layout.group_width == vb.rows  # one group: contiguous columns
            target = rows[:, layout.offset : layout.offset + vb.rows] if contiguous else layout.view(rows, vb.rows)
            if packed:
                target.add_(packed_linear(u, packed.b[p]).view(target.shape), alpha=scale)
                continue
            b = sl.weight[slot, : vb.rows, : vb.cols]
            if contiguous:
                target.addmm_(u, b.t(), alpha=scale)
            else:  # [t, groups, group_width], strided
                target.add_(matmul_packed(u, b, vb.blocks).view(target.shape), alpha=scale)
    return out


def _slot_views(views: Sequence[FactorView | None]) -> SlotViews:
    return views if isinstance(views, SlotViews) else SlotViews(views)


def _rank_space(z: torch.Tensor, width: int, p: int, slices: int, chunks: int) -> torch.Tensor:
    """Slice p's first width / chunks rank columns of every gathered piece of z: [t, width] (a view if one piece)."""
    t, per = z.shape[0], width // chunks
    pieces = z.view(t, chunks, -1, slices)[:, :, :per, p]  # [t, chunks, per]
    return pieces[:, 0] if chunks == 1 else pieces.reshape(t, width)


def _aligned(t: torch.Tensor) -> bool:
    """Whether grouped_mm takes the tensor: every stride but the unit one a multiple of 16 bytes."""
    return all(stride * t.element_size() % 16 == 0 for stride in t.stride() if stride != 1)


def _grouped_matmul(x: torch.Tensor, weight: torch.Tensor, run: Run) -> torch.Tensor:
    """y[rows of slot s] = x_rows @ W_s.T over one run ([t, >= in_width] -> [t, rows]), W_s = weight[s, :rows, :cols].

    A decode-sized run of several slots is one grouped matmul reading each slot's factor in place (no gathered
    copies; on CPU, for the dtypes and strides torch's grouped_mm takes, dense factors); otherwise one matmul per
    segment.
    """
    v = run.view
    x = x[:, : v.in_width]
    if run.offsets is not None and x.device.type == "cpu" and x.dtype in GROUPED_DTYPES and v.blocks == 1:
        w = weight[run.slots, : v.rows, : v.cols]  # [slots of the run, rows, cols], a view
        if _aligned(x) and _aligned(w):
            return F.grouped_mm(x, w.transpose(1, 2), offs=run.offsets)
    if len(run.segments) == 1:
        return matmul_packed(x, weight[run.segments[0][0], : v.rows, : v.cols], v.blocks)
    y = x.new_empty(x.shape[0], v.rows)
    for slot, lo, hi in run.segments:
        y[lo - run.lo : hi - run.lo] = matmul_packed(x[lo - run.lo : hi - run.lo], weight[slot, : v.rows, : v.cols],
                                                     v.blocks)
    return y


set_backend(os.environ.get("MEGATRON_BDLORA_LORA_BACKEND", "auto"))
