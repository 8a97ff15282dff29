"""Launchers of the segment LoRA kernel: tile sizes, grid, and the two directions (shrink, expand).

The grid depends on the token count and the slot views only (see segment_lora.py), never on the batch's
contents; tiles follow the work: small token tiles for decode, wide K tiles and split-K for the shrink's long
input rows with a handful of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton

from megatron_bdlora.kernels.segment_lora import segment_lora_kernel
from megatron_bdlora.lora_batch import ExpandSlice, GraphLaunch, OutputLayout, SlotBatch, SlotViews


def _pow2_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(value, 1))))


def _capacity_tiles(rows: int, block_n: int, max_blocks: int) -> int:
    """Output tiles enough for any view of at most `rows` rows in at most `max_blocks` blocks (CUDA graphs)."""
    return max(b * triton.cdiv(max(rows // b, 1), block_n) for b in range(1, max_blocks + 1))


def _launch(x, weight, out, views, batch, *, shrink, scalings=None, layout=None, in_chunks=1, chunk_stride=0,
            in_slices=(0, 1), split_k=1, block_m=None, block_n=None, block_k=None, fixed_grid=None,
            graph: GraphLaunch | None = None):
    # in_slices (p, P): x's columns are P slices row-interleaved (a packed rank space), this launch reads slice p
    if x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("segment LoRA kernel: inputs and outputs need contiguous rows (last stride 1)")
    n = batch.num_tokens
    block_m = block_m or (16 if n <= 256 else 64)
    if graph is not None:  # sized for the stack's capacity: adapters loaded after the capture still fit
        if n == 0:
            return
        block_n = block_n or _pow2_between(weight.shape[1], 16, 64)
        block_k = block_k or _pow2_between(weight.shape[2], 16, 128 if shrink else 64)
        grid = (triton.cdiv(n, block_m), _capacity_tiles(weight.shape[1], block_n, graph.max_blocks) * split_k,
                batch.slot_counts.numel())
        table = graph.table
    else:
        live = [v for v in views if v is not None]
        if not live or n == 0:
            return
        block_n = block_n or _pow2_between(max(v.rows // v.blocks for v in live), 16, 64)
        block_k = block_k or _pow2_between(max(v.cols for v in live), 16, 128 if shrink else 64)
        tiles = views.output_tiles(block_n)
        table = views.table(x.device)
        if x.is_cuda if fixed_grid is None else fixed_grid:  # fixed by the token count and views
            grid = (triton.cdiv(n, block_m), tiles * split_k, batch.slot_counts.numel())
        else:  # Triton's interpreter pays per program: launch only the active slots' tiles (host metadata is free)
            if not batch.segments:
                return
            longest = max(stop - start for _, start, stop in batch.segments)
            grid = (triton.cdiv(longest, block_m), tiles * split_k, len(batch.segments))
    layout = layout or OutputLayout.contiguous(weight.shape[1])
    segment_lora_kernel[grid](
        x, weight, out, scalings if scalings is not None else out,
        batch.order, batch.slot_starts, batch.slot_counts, batch.active_slots, table,
        x.stride(0), weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0),
        in_chunks, chunk_stride, in_slices[1], in_slices[0], layout.group_width, layout.group_stride, layout.offset,
        X_BY_TOKEN=shrink, OUT_BY_TOKEN=not shrink, HAS_SCALE=scalings is not None, ACCUMULATE=not shrink,
        SPLIT_K=split_k, PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )


def default_split_k(num_tokens: int, cols: int) -> int:
    """Split the shrink's K loop when few tokens meet a long input row (decode), so more programs share it."""
    if num_tokens > 256:
        return 1
    return max(1, min(16, cols // 512))


def shrink(x: torch.Tensor, weight: torch.Tensor, views: SlotViews, batch: SlotBatch, split_k: int | None = None,
           graph: GraphLaunch | None = None, **tiles) -> torch.Tensor:
    """ops.lora_shrink on the GPU: z [n, R] in slot order (float32 when split-K sums atomically)."""
    return shrink_packed(x, weight, [views], batch, split_k, [graph], **tiles)


def shrink_packed(x: torch.Tensor, weight: torch.Tensor, slices: Sequence[SlotViews], batch: SlotBatch,
                  split_k: int | None = None, graphs: Sequence[GraphLaunch | None] | None = None,
                  **tiles) -> torch.Tensor:
    """ops.lora_shrink_packed on the GPU in one launch: a slot's rows of all slices are one dense matrix of the
    row-interleaved stack (SlotViews.interleaved), so the kernel computes z's P * r columns as one projection."""
    split_k = split_k or default_split_k(batch.num_tokens, weight.shape[2])
    dtype = torch.float32 if split_k > 1 else x.dtype
    z = torch.zeros(x.shape[0], weight.shape[1], dtype=dtype, device=x.device)
    _launch(x, weight, z, SlotViews.interleaved(slices), batch, shrink=True, split_k=split_k,
            graph=_interleaved_graph(graphs, len(slices)), **tiles)
    return z


def _interleaved_graph(graphs: Sequence[GraphLaunch | None] | None, slices: int) -> GraphLaunch | None:
    """The packed stack's launch under CUDA graphs: its slot table derived from the slices' tables on the device
    (recorded in the graph, so a replay reads the tables that loads rewrite in place): a slot's rows are P times
    those of any slice it holds (the slices of a slot agree, a slice it lacks has 0 rows)."""
    if not graphs or graphs[0] is None:
        return None
    if slices == 1:
        return graphs[0]
    table = torch.stack([g.table for g in graphs]).amax(0)  # [slots, 3]: (rows, cols, blocks) of the held slices
    table = torch.cat([table[:, :1] * slices, table[:, 1:]], dim=1)  # device ops only: no host copy while capturing
    return GraphLaunch(table, max(g.max_blocks for g in graphs))


def expand(z: torch.Tensor, weight: torch.Tensor, views: SlotViews, scalings: torch.Tensor, batch: SlotBatch,
           out: torch.Tensor, layout: OutputLayout, in_chunks: int = 1, graph: GraphLaunch | None = None,
           **tiles) -> torch.Tensor:
    """ops.lora_expand on the GPU: adds into out in place (fused layout), tokens without an adapter untouched."""
    return expand_packed(z, [ExpandSlice(weight, views, scalings, layout, graph)], batch, out, in_chunks, **tiles)


def expand_packed(z: torch.Tensor, slices: Sequence[ExpandSlice], batch: SlotBatch, out: torch.Tensor,
                  in_chunks: int = 1, **tiles) -> torch.Tensor:
    """ops.lora_expand_packed on the GPU: one launch per slice, reading its interleaved columns of z."""
    for p, sl in enumerate(slices):
        _launch(z, sl.weight, out, sl.views, batch, shrink=False, scalings=sl.scalings, layout=sl.layout,
                in_chunks=in_chunks, chunk_stride=z.shape[1] // in_chunks, in_slices=(p, len(slices)),
                graph=sl.graph, **tiles)
    return out
