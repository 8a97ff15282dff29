"""Multi-adapter LoRA: add the LoRA outputs of many adapters to one batch of tokens.

A LoRA branch is a *shrink* (x -> rank space, by A) and an *expand* (rank space -> out, by B), with the
sharding plan's collective (if any) between them; this module knows nothing about TP. Factors live in
stacks of adapter slots sized for the largest adapter ([slots, rows, cols]); each slot has its own view
(rows, cols, blocks) of its stack entry, so adapters of different ranks and block counts share one batch
and a small adapter does only its own work (its slice of the stack, never padded zeros).

Serving sorts the batch's tokens by slot once per step (`SlotBatch`, device tensors built without a host
sync); every layer reuses it. The shrink reads the tokens in slot order and writes the rank space in that
order; the expand adds each slot's output straight into the layer's output (fused layout included, see
`OutputLayout`), leaving tokens without an adapter untouched. These step types live in `lora_batch`, below both
backends. Two backends share these signatures: the Triton kernels (`megatron_bdlora.kernels`, CUDA tensors) and
torch (CPU); `use_backend` forces one. Training uses one slot and no grouping (`matmul_packed`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

from megatron_bdlora.lora_batch import FactorView, GraphLaunch, OutputLayout, SlotBatch, SlotViews

# torch path: up to this many tokens, adjacent same-shape slots run as one matmul with gathered factors
GATHER_TOKENS = 64
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
    views = views if isinstance(views, SlotViews) else SlotViews(views)
    if _triton_for(x):
        # lazy: Triton loads on the first kernel launch only (never on CPU paths), after callers chose TRITON_INTERPRET
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
        from megatron_bdlora import kernels  # (see lora_shrink)

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
    order = batch.host_order()
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
    fills_all, groups = batch.plan(views, width, GATHER_TOKENS)
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
                xb = xs.reshape(hi - lo, v.blocks, v.cols)  # [t, k, cols]
                wb = wt.reshape(hi - lo, v.blocks, v.rows // v.blocks, v.cols)  # [t, k, rows/k, cols]
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
