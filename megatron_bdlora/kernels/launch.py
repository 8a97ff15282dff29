"""Launchers of the segment LoRA kernel: tile sizes, grid, and the two directions (shrink, expand).

The grid depends on the token count and the slot views only (see segment_lora.py), never on the batch's
contents; tiles follow the work: small token tiles for decode, wide K tiles and split-K for the shrink's long
input rows with a handful of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from megatron_bdlora.kernels.segment_lora import lora_expand_kernel, lora_shrink_kernel
from megatron_bdlora.lora_batch import ExpandSlice, GraphLaunch, OutputLayout, SlotBatch, SlotViews


def _pow2_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(value, 1))))


def _capacity_tiles(rows: int, block_n: int, max_blocks: int) -> int:
    """Output tiles enough for any view of at most `rows` rows in at most `max_blocks` blocks (CUDA graphs)."""
    return max(b * triton.cdiv(max(rows // b, 1), block_n) for b in range(1, max_blocks + 1))


@dataclass(frozen=True)
class _Launch:
    """A launch's grid and tile sizes, and per factor stack its slot table and its first tile on grid axis 1."""

    grid: tuple[int, int, int]
    block_m: int
    block_n: int
    block_k: int
    tables: tuple[torch.Tensor, ...]
    first_tiles: tuple[int, ...]  # one per stack, then the end


def _plan_launch(batch: SlotBatch, stacks: Sequence[tuple[torch.Tensor, SlotViews, GraphLaunch | None]],
                 device: torch.device, *, max_block_k: int, split_k: int = 1, block_m: int | None = None,
                 block_n: int | None = None, block_k: int | None = None,
                 fixed_grid: bool | None = None) -> _Launch | None:
    """Size a launch over the output tiles of one or more factor stacks side by side (None: nothing to compute).
    Under CUDA graphs (GraphLaunch given) the grid fits the stacks' capacity, so adapters loaded after the capture
    still fit; otherwise it fits today's views."""
    n = batch.num_tokens
    if n == 0:
        return None
    block_m = block_m or (16 if n <= 256 else 64)
    graphed = stacks[0][2] is not None
    if graphed:
        block_n = block_n or _pow2_between(max(w.shape[1] for w, _, _ in stacks), 16, 64)
        block_k = block_k or _pow2_between(max(w.shape[2] for w, _, _ in stacks), 16, max_block_k)
        tiles = [_capacity_tiles(w.shape[1], block_n, g.max_blocks) for w, _, g in stacks]
        tables = tuple(g.table for _, _, g in stacks)
    else:
        live = [v for _, views, _ in stacks for v in views if v is not None]
        if not live:
            return None
        block_n = block_n or _pow2_between(max(v.rows // v.blocks for v in live), 16, 64)
        block_k = block_k or _pow2_between(max(v.cols for v in live), 16, max_block_k)
        tiles = [views.output_tiles(block_n) for _, views, _ in stacks]
        tables = tuple(views.table(device) for _, views, _ in stacks)
    first_tiles = tuple(sum(tiles[:p]) * split_k for p in range(len(stacks) + 1))
    if graphed or (device.type == "cuda" if fixed_grid is None else fixed_grid):  # fixed by tokens and views
        grid = (triton.cdiv(n, block_m), first_tiles[-1], batch.slot_counts.numel())
    else:  # Triton's interpreter pays per program: launch only the active slots' tiles (host metadata is free)
        if not batch.segments:
            return None
        longest = max(stop - start for _, start, stop in batch.segments)
        grid = (triton.cdiv(longest, block_m), first_tiles[-1], len(batch.segments))
    return _Launch(grid, block_m, block_n, block_k, tables, first_tiles)


def _check_rows(*tensors: torch.Tensor) -> None:
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("segment LoRA kernel: inputs and outputs need contiguous rows (last stride 1)")


def _precision(weight: torch.Tensor) -> str:
    return "ieee" if weight.dtype == torch.float32 else "tf32"  # float32 stays exact (no TF32)


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
    _check_rows(x, z)
    stack = (weight, SlotViews.interleaved(slices), _interleaved_graph(graphs, len(slices)))
    plan = _plan_launch(batch, [stack], x.device, max_block_k=128, split_k=split_k, **tiles)
    if plan is not None:
        lora_shrink_kernel[plan.grid](
            x, weight, z, batch.order, batch.slot_starts, batch.slot_counts, batch.active_slots, plan.tables[0],
            x.stride(0), weight.stride(0), weight.stride(1), weight.stride(2), z.stride(0),
            SPLIT_K=split_k, PRECISION=_precision(weight),
            BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        )
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
    """ops.lora_expand_packed on the GPU in one launch for all slices (slice p reads z's interleaved columns
    j * P + p and adds into its own output columns): grid axis 1 holds each slice's output tiles in turn."""
    _check_rows(z, out)
    stacks = [(sl.weight, sl.views, sl.graph) for sl in slices]
    plan = _plan_launch(batch, stacks, z.device, max_block_k=64, **tiles)
    if plan is None:
        return out
    each = lambda f: tuple(f(sl) for sl in slices)  # noqa: E731  (one value per slice: the kernel's tuples)
    lora_expand_kernel[plan.grid](
        z, each(lambda sl: sl.weight), out, each(lambda sl: sl.scalings),
        batch.order, batch.slot_starts, batch.slot_counts, batch.active_slots, plan.tables,
        z.stride(0), each(lambda sl: sl.weight.stride(0)), each(lambda sl: sl.weight.stride(1)),
        each(lambda sl: sl.weight.stride(2)), out.stride(0), in_chunks, z.shape[1] // in_chunks,
        each(lambda sl: sl.layout.group_width), each(lambda sl: sl.layout.group_stride),
        each(lambda sl: sl.layout.offset), plan.first_tiles,
        SLICES=len(slices), PRECISION=_precision(slices[0].weight),
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
    )
    return out
