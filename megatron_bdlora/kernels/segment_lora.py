"""Triton kernels of the multi-adapter LoRA ops: one grouped, packed-block matmul serves shrink and expand.

Both halves of a LoRA branch are, per token t of slot s, y[t, o] = sum_k in[t, b(o) * cols_s + k] * W[s, o, k]
with b(o) = o // (rows_s / blocks_s): a dense factor is one block, a packed block-diagonal factor (BD-LoRA,
k blocks per rank) maps input chunk b to output chunk b. The grid is (token tiles, output tiles x split-K,
slot capacity); its size depends only on the step's token count and the slot views, never on the batch's
contents, so a captured CUDA graph replays any mix of adapters. A program reads its slot and segment from
the step's metadata (lora_batch.SlotBatch) and exits at once when its slot is idle, its tile lies past the slot's
tokens, rank or blocks: a rank-8 slot beside a rank-64 one does rank-8 work.

Shrink reads tokens through the sort order and writes the rank space in slot order; expand reads it in slot
order and adds into the output rows of the tokens at the columns the output layout names (a fused q/k/v or
gate/up output, or a row S-LoRA slice), so tokens without an adapter are never touched. A packed projection's
slices share one rank space, row-interleaved (slice p's rank row j in column j * slices + p): the shrink writes
its slice's columns through an output layout, the expand reads them with in_stride / in_offset. The packed
expand runs every slice in one launch (`lora_expand_kernel`: the slices' output tiles side by side on grid axis 1).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lora_shrink_kernel(
    x_ptr, w_ptr, z_ptr,
    order_ptr, starts_ptr, counts_ptr, active_ptr, views_ptr,
    stride_xm, stride_ws, stride_wr, stride_wc, stride_zm,
    SPLIT_K: tl.constexpr,  # > 1: partial sums atomically added into a float32 z
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" keeps float32 exact (no TF32)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The shrink: tokens read through the sort order, the rank space stored in slot order (z zeroed before)."""
    _segment_tile(
        x_ptr, w_ptr, z_ptr, z_ptr, order_ptr, starts_ptr, counts_ptr, active_ptr, views_ptr,
        stride_xm, stride_ws, stride_wr, stride_wc, stride_zm,
        1, 0, 1, 0, BLOCK_N, BLOCK_N, 0, tl.program_id(1),
        True, False, False, False, SPLIT_K, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )


@triton.jit
def lora_expand_kernel(
    z_ptr, w_ptrs, out_ptr, scale_ptrs,
    order_ptr, starts_ptr, counts_ptr, active_ptr, views_ptrs,
    stride_zm, stride_ws, stride_wr, stride_wc, stride_om,
    in_chunks, chunk_stride, group_widths, group_strides, out_offsets, first_tiles,
    SLICES: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The expand of all P slices of a packed projection in one launch: grid axis 1 holds slice 0's output tiles,
    then slice 1's, ... (slice p's are first_tiles[p] to first_tiles[p + 1]); a program runs its slice's tile as
    the one-slice kernel would (slice p reads the rank columns j * P + p of z, adds into its own output columns)."""
    pid = tl.program_id(1)
    for p in tl.static_range(SLICES):
        if (pid >= first_tiles[p]) & (pid < first_tiles[p + 1]):
            _segment_tile(
                z_ptr, w_ptrs[p], out_ptr, scale_ptrs[p], order_ptr, starts_ptr, counts_ptr, active_ptr,
                views_ptrs[p], stride_zm, stride_ws[p], stride_wr[p], stride_wc[p], stride_om,
                in_chunks, chunk_stride, SLICES, p, group_widths[p], group_strides[p], out_offsets[p],
                pid - first_tiles[p],
                False, True, True, True, 1, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )


@triton.jit
def _segment_tile(
    x_ptr, w_ptr, out_ptr, scale_ptr,
    order_ptr, starts_ptr, counts_ptr, active_ptr, views_ptr,
    stride_xm, stride_ws, stride_wr, stride_wc, stride_om,
    in_chunks, chunk_stride, in_stride, in_offset, group_width, group_stride, out_offset, tile,
    X_BY_TOKEN: tl.constexpr, OUT_BY_TOKEN: tl.constexpr, HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
    SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program's tile: `tile` numbers its output tile (times SPLIT_K) within one factor stack."""
    slot = tl.load(active_ptr + tl.program_id(2))
    m0 = tl.program_id(0) * BLOCK_M
    live = slot >= 0
    safe_slot = tl.maximum(slot, 0)
    count = tl.load(counts_ptr + safe_slot)
    rows = tl.where(live, tl.load(views_ptr + safe_slot * 3), 0)
    cols = tl.load(views_ptr + safe_slot * 3 + 1)
    blocks = tl.maximum(tl.load(views_ptr + safe_slot * 3 + 2), 1)
    pid_n = tile // SPLIT_K
    pid_k = tile % SPLIT_K
    block_rows = rows // blocks
    tiles_per_block = tl.maximum((block_rows + BLOCK_N - 1) // BLOCK_N, 1)  # (no tl.cdiv: it breaks the
    # interpreter when triton was imported before TRITON_INTERPRET was set, as megatron does)
    block = pid_n // tiles_per_block
    # structured exits (no early return: a helper with one inlines): an idle slot, a tile past the slot's tokens,
    # rank or blocks does nothing
    if (m0 < count) & (rows != 0) & (block < blocks):
        n0 = block * block_rows + (pid_n % tiles_per_block) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < (block + 1) * block_rows

        start = tl.load(starts_ptr + slot)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        tokens = tl.load(order_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
        x_rows = tokens if X_BY_TOKEN else (start + offs_m).to(tl.int64)
        out_rows = tokens if OUT_BY_TOKEN else (start + offs_m).to(tl.int64)

        per_chunk = cols * blocks // in_chunks  # a slot's rank-space columns per gathered piece
        k_span = ((cols + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K * BLOCK_K
        k_lo = pid_k * k_span
        k_hi = tl.minimum(k_lo + k_span, cols)
        w_base = w_ptr + slot.to(tl.int64) * stride_ws
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
            j = block * cols + offs_k  # the slot's input column
            x_cols = (j // per_chunk) * chunk_stride + (j % per_chunk) * in_stride + in_offset
            xt = tl.load(
                x_ptr + x_rows[:, None] * stride_xm + x_cols[None, :],
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            wt = tl.load(
                w_base + offs_n[None, :] * stride_wr + offs_k[:, None] * stride_wc,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = tl.dot(xt.to(wt.dtype), wt, acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N], float32
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + slot)
        out_cols = (offs_n // group_width) * group_stride + out_offset + offs_n % group_width
        ptrs = out_ptr + out_rows[:, None] * stride_om + out_cols[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(ptrs, acc, mask=mask)
        else:
            if ACCUMULATE:
                acc = acc + tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
