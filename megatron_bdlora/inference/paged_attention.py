"""Vectorised torch attention over megatron-core's paged KV cache: flash-attn's stand-in on a GPU without it.

Why: megatron-core 0.16.1's dynamic engine runs `Attention.flash_decode_and_prefill`, i.e. flash-attn's
varlen / kvcache kernels (flash-attn >= 2.7.3, asserted in `Attention.forward`). flash-attn ships as source
only, so a GPU host without a matching build could not serve at all. The CPU stand-in
(`cpu_fallbacks.paged_attention`) loops over prefill requests in Python and reads lengths with `int()` /
`.tolist()`: right on a CPU, but on a GPU every iteration is a host sync plus a few tiny kernel launches, and
it cannot be captured in a CUDA graph. This version does the whole step in one `scaled_dot_product_attention`
call over padded tensors whose sizes come only from Python ints and tensor shapes: no per-request loop, no host
sync, no data-dependent shape, so it also records into (and replays from) megatron's CUDA graphs.

What megatron passes (0.16.1, `contexts/attention_context/mha_metadata.py`); both are host ints:
- eager steps (`NonGraphedMHAMetadata`): max_seqlen_q = max(query lengths), max_seqlen_k = max(kv lengths),
  read by megatron itself with `.item()` -> tight padding here, no sync of ours.
- CUDA-graph steps (`GraphedMHAMetadata`): max_seqlen_q = 1 for decode graphs, else max(2, padded token
  count); max_seqlen_k = the context's max_sequence_length -> constants of the graph (here: the full
  block-table width and m = T), so a graph captured at one set of lengths is right for any other.

Which variant runs:
- `paged_attention` (what `Attention.flash_decode_and_prefill` becomes): `static=None` picks the tight sizes
  above, and switches to the static sizes when max_seqlen_q / max_seqlen_k are not Python ints (tensors would
  need a sync) or when a CUDA graph is being captured (`torch.cuda.is_current_stream_capturing()`).
- `paged_attention(..., static=True)`: always the static sizes (all block-table columns, m = T query rows per
  request, or 1 on decode-only steps) - shapes depend on nothing but the tensors' shapes.

Cost: keys / values are gathered to [R, Hkv, Lpad, D] and queries padded to [R, m, Hq, D]; attention work is
R * m * Lpad per head, i.e. a mixed eager step pads every request (decodes included) to the longest chunk, and a
graphed step reads every request's full block table (flash-attn stops at each request's length). Decode-only
steps (is_decode_only: every query length <= 1) take m = 1 with no causal mask to build.

GQA: the g = Hq / Hkv query heads sharing a KV head are folded into SDPA's query axis ([R, Hkv, m * g, D])
instead of `enable_gqa=True`: identical result, K / V never repeated, and SDPA's memory-efficient CUDA kernel
(the one that takes a mask) stays eligible.

Notation in the shape comments: T packed query tokens (padded), R requests (block-table rows, padded),
Hq / Hkv query / KV heads, g = Hq // Hkv, D head dim, bs block size, n gathered blocks, Lpad = n * bs,
m padded queries per request.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def paged_attention(
    self,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    max_seqlen_q,
    max_seqlen_k,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    seqlens_k: Tensor,
    block_table: Tensor,
    is_decode_only: bool,
    static: bool | None = None,
    **kwargs,
) -> Tensor:
    """Causal attention of packed queries over megatron's paged KV cache, one SDPA call for the whole step.

    Request i owns queries cu_seqlens_q[i]:cu_seqlens_q[i+1] (lq of them, already in the cache) and the first
    L = seqlens_k[i] cached tokens, stored in blocks block_table[i, :ceil(L / block_size)]; its query j sits at
    position L - lq + j and sees cached positions <= that one. GQA: query head h reads KV head h // (Hq / Hkv).
    softmax_scale from `self` when set (as megatron's flash path), else 1/sqrt(D). Padding requests (lq = 0)
    and padding tokens (past cu_seqlens_q[-1]) give zeros; cache slots past L (never written: may hold NaN /
    inf) are zeroed before the matmuls. `static` (None = auto): see the module docstring.
    q: [T, 1, Hq, D]; k, v: [blocks, bs, Hkv, D] this layer's cache; returns [T, 1, Hq, D].
    """
    if any(value is not None for value in kwargs.values()):
        raise NotImplementedError(f"torch paged attention does not support {sorted(kwargs)}")
    if v is None:
        raise NotImplementedError("torch paged attention does not support MLA's latent KV cache")
    scale = getattr(self, "softmax_scale", None)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q.squeeze(1)  # [T, 1, Hq, D] -> [T, Hq, D]
    T, Hq, D = q.shape
    bs, Hkv = k.shape[1], k.shape[2]
    R, width = block_table.shape
    if static is None:
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        static = capturing or not (_is_int(max_seqlen_q) and _is_int(max_seqlen_k))
    n = width if static else min(width, max(1, math.ceil(max_seqlen_k / bs)))  # blocks gathered per request
    if R == 0 or T == 0:
        return torch.zeros_like(q).unsqueeze(1)  # [T, 1, Hq, D]
    if is_decode_only:
        m = 1
    else:
        m = T if static else min(T, max(1, int(max_seqlen_q)))  # query rows per request (lq <= T always)

    starts = cu_seqlens_q[:-1].long()  # [R] first packed token of each request
    q_lens = cu_seqlens_q[1:].long() - starts  # [R] (0 for padding requests)
    lens = seqlens_k.long()  # [R] cached tokens each request sees (its queries included)
    keys, values = _gather_pages(k, v, block_table[:, :n], lens)  # [R, Hkv, Lpad, D] each
    key_pos = torch.arange(n * bs, device=q.device)  # [Lpad]
    # query j of request r sits at L - lq + j: it sees key positions <= that. Rows j >= lq (padding) then see
    # up to >= L, never an empty row (no NaN from an all-masked softmax); they are not read back.
    last_visible = lens - q_lens  # [R] position of query 0

    g = Hq // Hkv
    if m == 1:
        # decode step: each request's one query; its g heads per KV head become SDPA's query axis
        queries = q[starts.clamp(max=T - 1)].view(R, Hkv, g, D)  # [R, Hq, D] -> [R, Hkv, g, D]
        mask = (key_pos[None, :] <= last_visible[:, None])[:, None, None, :]  # [R, Lpad] -> [R, 1, 1, Lpad]
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        # attended: [R, Hkv, g, D] (fused kernels may return it strided: reshape, not view)
        per_request = attended.reshape(R, 1, Hq, D)  # [R, Hkv, g, D] -> [R, m=1, Hq, D]
    else:
        rows = torch.arange(m, device=q.device)  # [m]
        sources = (starts[:, None] + rows[None, :]).clamp(max=T - 1)  # [R, m] packed token of each query row
        # rows j >= lq pick some other (finite) token: rows are independent in attention and never read back
        queries = (
            q[sources]  # [R, m, Hq, D]
            .view(R, m, Hkv, g, D)  # [R, m, Hkv, g, D]
            .permute(0, 2, 1, 3, 4)  # [R, Hkv, m, g, D]
            .reshape(R, Hkv, m * g, D)  # [R, Hkv, m*g, D] row j*g + i = query j, head i of this KV head's group
        )
        causal = key_pos[None, None, :] <= (last_visible[:, None] + rows[None, :])[:, :, None]  # [R, m, Lpad]
        mask = causal[:, :, None, :].expand(R, m, g, n * bs).reshape(R, 1, m * g, n * bs)  # [R, 1, m*g, Lpad]
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        # attended: [R, Hkv, m*g, D] (fused kernels may return it strided: reshape, not view)
        per_request = (
            attended.reshape(R, Hkv, m, g, D)  # [R, Hkv, m, g, D]
            .permute(0, 2, 1, 3, 4)  # [R, m, Hkv, g, D]
            .reshape(R, m, Hq, D)  # [R, m, Hq, D]
        )
    return _to_packed(per_request, cu_seqlens_q, starts, T).unsqueeze(1)  # [T, Hq, D] -> [T, 1, Hq, D]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _gather_pages(k: Tensor, v: Tensor, blocks: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
    """Each request's first n pages as contiguous [R, Hkv, n*bs, D] keys / values, slots >= its length zeroed.

    Unused table entries (-1) read block 0 and slots past L may never have been written (torch.empty: NaN, inf);
    both are zeroed, since a masked-out key still meets the value matmul (SDPA's 0 weight * NaN is NaN).
    """
    R, n = blocks.shape
    bs = k.shape[1]
    blocks = blocks.clamp(min=0).long()  # [R, n]
    hidden = (torch.arange(n * bs, device=k.device)[None, :] >= lens[:, None])[:, :, None, None]  # [R, Lpad, 1, 1]
    keys = k[blocks].flatten(1, 2).masked_fill_(hidden, 0)  # [R, n, bs, Hkv, D] -> [R, Lpad, Hkv, D]
    values = v[blocks].flatten(1, 2).masked_fill_(hidden, 0)  # [R, Lpad, Hkv, D]
    return keys.transpose(1, 2), values.transpose(1, 2)  # [R, Hkv, Lpad, D] each


def _to_packed(per_request: Tensor, cu_seqlens_q: Tensor, starts: Tensor, T: int) -> Tensor:
    """[R, m, Hq, D] per-request rows back to the packed [T, Hq, D] layout; padding tokens get zeros."""
    R, m, Hq, D = per_request.shape
    tokens = torch.arange(T, device=per_request.device, dtype=cu_seqlens_q.dtype)  # [T]
    # request of token t: the number of requests that end at or before t (zero-length requests included)
    owner = torch.searchsorted(cu_seqlens_q[1:].contiguous(), tokens, right=True).clamp(max=R - 1)  # [T]
    row = (tokens.long() - starts[owner]).clamp(0, m - 1)  # [T] query row within its request
    packed = per_request.reshape(R * m, Hq, D)[owner * m + row]  # [R*m, Hq, D] -> [T, Hq, D]
    padding = (tokens >= cu_seqlens_q[-1])[:, None, None]  # [T, 1, 1]
    return packed.masked_fill_(padding, 0)
