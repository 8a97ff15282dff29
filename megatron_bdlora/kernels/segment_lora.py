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
its slice's columns through an output layout, the expand reads them with in_stride / in_offset.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def segment_lora_kernel(
    x_ptr, w_ptr, out_ptr, scale_ptr,
    order_ptr, starts_ptr, counts_ptr, active_ptr, views_ptr,
    stride_xm, stride_ws, stride_wr, stride_wc, stride_om,
    in_chunks, chunk_stride, in_stride, in_offset, group_width, group_stride, out_offset,
    X_BY_TOKEN: tl.constexpr,  # x rows are token positions (shrink) or slot-order rows (expand)
    OUT_BY_TOKEN: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add into out (expand) or store (shrink into a zeroed buffer)
    SPLIT_K: tl.constexpr,  # > 1: partial sums atomically added into a float32 out
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" keeps float32 exact (no TF32)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    slot = tl.load(active_ptr + tl.program_id(2))
    if slot < 0:
        return
    count = tl.load(counts_ptr + slot)
    rows = tl.load(views_ptr + slot * 3)
    m0 = tl.program_id(0) * BLOCK_M
    if (m0 >= count) | (rows == 0):
        return
    cols = tl.load(views_ptr + slot * 3 + 1)
    blocks = tl.load(views_ptr + slot * 3 + 2)
    pid_n = tl.program_id(1) // SPLIT_K
    pid_k = tl.program_id(1) % SPLIT_K
    block_rows = rows // blocks
    tiles_per_block = (block_rows + BLOCK_N - 1) // BLOCK_N  # (no tl.cdiv: it breaks the interpreter when triton
    # was imported before TRITON_INTERPRET was set, as megatron does)
    block = pid_n // tiles_per_block
    if block >= blocks:
        return
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
            x_ptr + x_rows[:, None] * stride_xm + x_cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
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
