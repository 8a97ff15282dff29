"""Which paged attention megatron-core's dynamic engine runs here, and the stand-ins that make it run.

megatron-core 0.16.1's DynamicInferenceEngine / DynamicInferenceContext / TextGenerationController assert
flash-attn >= 2.7.3 (or FA3) and call its paged kernels in `Attention.flash_decode_and_prefill`. flash-attn is
a source-only package, so hosts without a build of it get a torch attention instead, decided once per process
by `apply_inference_fallbacks()` (called first thing by `dynamic.build_dynamic_engine`):

| CUDA | usable flash-attn (FA3, FA2>=2.7.3) | path (returned, logged once)             | patched                     |
|------|-------------------------------------|------------------------------------------|-----------------------------|
| yes  | yes                                 | "flash-attn"                             | nothing                     |
| yes  | no                                  | "torch-paged (CUDA, flash-attn missing)" | version check + attention * |
| no   | (not asked)                         | "torch-cpu"                              | all the stand-ins below     |

* `Attention.flash_decode_and_prefill` = `paged_attention.paged_attention` (vectorised, no host sync, graph-safe).

On CPU a few CUDA-only calls are replaced too (NVTX ranges, CUDA events and syncs, suspend/resume memory stats,
pinned buffers, the Triton KV append) and attention is this module's `paged_attention` (batched SDPA for
single-query requests, a Python loop over prefill chunks). On a GPU without flash-attn megatron's own Triton
KV append, CUDA events, pinned buffers and NVTX stay. Everything else (paged KV cache, scheduling, chunked
prefill, pausing, eviction, sampling) is megatron's own code in every case.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.inference.contexts import dynamic_context
from megatron.core.inference.engines import dynamic_engine
from megatron.core.inference.text_generation_controllers.text_generation_controller import TextGenerationController
from megatron.core.transformer import attention
from megatron.core.utils import is_fa_min_version  # megatron's, not attention's (patched below)
from torch import Tensor

from megatron_bdlora.inference.paged_attention import paged_attention as vectorised_paged_attention

FLASH_ATTN = "flash-attn"
TORCH_PAGED_CUDA = "torch-paged (CUDA, flash-attn missing)"
TORCH_CPU = "torch-cpu"

logger = logging.getLogger(__name__)
_applied: str | None = None  # the path patched in, once apply_inference_fallbacks() ran


def choose_attention_path(cuda_available: bool, flash_attn_ok: bool) -> str:
    """The attention path for a host: flash-attn where CUDA and a usable flash-attn are both there."""
    if not cuda_available:
        return TORCH_CPU
    return FLASH_ATTN if flash_attn_ok else TORCH_PAGED_CUDA


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _flash_attn_ok() -> bool:
    """megatron's own condition for dynamic batching: FA3 imported, or flash-attn's kernels and version >= 2.7.3."""
    try:
        if attention.HAVE_FA3:
            return True
        if attention.flash_attn_varlen_func is None or attention.flash_attn_with_kvcache is None:
            return False
        return bool(is_fa_min_version("2.7.3"))
    except Exception:  # flash_attn missing (ImportError) or broken (its CUDA extension failing to load)
        return False


def attention_path_here() -> str:
    """The path `apply_inference_fallbacks()` picks (or picked) in this process; patches nothing."""
    if _applied is not None:
        return _applied
    cuda = _cuda_available()
    return choose_attention_path(cuda, cuda and _flash_attn_ok())


def apply_inference_fallbacks() -> str:
    """Decide the attention path (see the module docstring), patch megatron for it, log it; idempotent."""
    global _applied
    if _applied is not None:
        return _applied
    path = attention_path_here()
    if path == TORCH_CPU:
        _patch_cuda_only_calls()
        _patch_attention(paged_attention)
    elif path == TORCH_PAGED_CUDA:
        _patch_attention(vectorised_paged_attention)
    _applied = path
    (logger.warning if path == TORCH_PAGED_CUDA else logger.info)(
        "megatron dynamic inference attention path: %s", path
    )
    return path


def _patch_attention(flash_decode_and_prefill) -> None:
    """Replace megatron's flash-attn paged attention and drop its flash-attn version assertion."""
    # the flash-attn >= 2.7.3 assertion for dynamic batching (its only use in attention.py)
    attention.is_fa_min_version = lambda version, *args, **kwargs: True
    # flash-attn varlen / kvcache kernels over the paged cache
    attention.Attention.flash_decode_and_prefill = flash_decode_and_prefill


def _patch_cuda_only_calls() -> None:
    """CPU stand-ins for the CUDA-only calls of megatron's inference stack (besides attention)."""
    # NVTX ranges: dynamic_engine imported range_push/range_pop by name; inference_request calls torch.cuda.nvtx.*
    dynamic_engine.range_push = torch.cuda.nvtx.range_push = _no_op
    dynamic_engine.range_pop = torch.cuda.nvtx.range_pop = _no_op
    # torch.cuda.Event (engine.reset() times each step with a pair of them)
    torch.cuda.Event = _CpuEvent
    # torch.cuda.synchronize (engine.resume() syncs around re-allocation)
    torch.cuda.synchronize = _no_op
    # suspend/resume log torch.cuda.memory_stats() keys, which a CPU build leaves empty
    dynamic_engine.DynamicInferenceEngine.suspend_resume_ctx = staticmethod(_untimed_ctx)
    # pinned host buffers for the sampling metadata (pinning needs a CUDA allocator)
    TextGenerationController._init_dynamic_sampling_tensors = _unpinned(
        TextGenerationController._init_dynamic_sampling_tensors
    )
    # the Triton KV-append kernel (asserts CUDA tensors): None selects the context's torch indexing path
    dynamic_context.triton_append_key_value_cache = None


def _no_op(*args, **kwargs) -> None:
    return None


class _CpuEvent:
    """torch.cuda.Event's timing subset on the host clock: record(), synchronize(), elapsed_time() in ms."""

    def __init__(self, enable_timing: bool = False, **kwargs) -> None:
        self._t: float | None = None

    def record(self, stream=None) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_CpuEvent") -> float:
        return (end._t - self._t) * 1e3


@contextlib.contextmanager
def _untimed_ctx(key: str, *, unified_memory_level: int):
    yield


def _unpinned(init_sampling_tensors):
    """The controller's buffer setup with `pin_memory=True` dropped from its torch.empty_like calls."""

    def wrapper(self) -> None:
        empty_like = torch.empty_like

        def empty_like_unpinned(*args, pin_memory: bool = False, **kwargs):
            return empty_like(*args, **kwargs)

        torch.empty_like = empty_like_unpinned
        try:
            init_sampling_tensors(self)
        finally:
            torch.empty_like = empty_like

    return wrapper


@dataclass(frozen=True)
class _DecodePlan:
    """What every layer's single-query attention reads the same way within one step (built once per step)."""

    tokens: Tensor  # [r] packed token of each single-query request
    blocks: Tensor  # [r * n] its cache blocks, request by request (-1 entries clamped to 0; hidden)
    visible: Tensor  # [r, n*bs] cache slots it sees
    hidden: Tensor  # [slots] the others, as rows of the gathered [r * n*bs] slots (zeroed: may hold NaN)
    prefill: tuple[int, ...]  # requests with more than one query (one loop iteration each)


_plan_cache: list = []  # [(copies of the metadata it was built from, block size), plan]: the current step's


def _step_plan(cu_seqlens_q: Tensor, seqlens_k: Tensor, block_table: Tensor, block_size: int) -> _DecodePlan:
    """The step's plan, rebuilt only when the metadata differs from the last call's: megatron passes the same
    metadata to every layer of a step (three small tensor comparisons per layer instead of ~10 ops)."""
    metadata = (cu_seqlens_q, seqlens_k, block_table)
    if _plan_cache:
        (seen, seen_block_size), plan = _plan_cache
        if seen_block_size == block_size and all(a.shape == b.shape and torch.equal(a, b)
                                                 for a, b in zip(seen, metadata)):
            return plan
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]  # [R] (R = padded request count; 0 for padding)
    single = torch.nonzero(q_lens == 1).squeeze(1)  # [r]
    lens = seqlens_k[single].long()  # [r]
    n_blocks = math.ceil(int(lens.max()) / block_size) if single.numel() else 0
    visible = torch.arange(n_blocks * block_size) < lens[:, None]  # [r, n*bs] the query is last: sees all L
    plan = _DecodePlan(cu_seqlens_q[single].long(), block_table[single, :n_blocks].clamp(min=0).reshape(-1).long(),
                       visible, torch.nonzero(~visible.reshape(-1)).squeeze(1),
                       tuple(torch.nonzero(q_lens > 1).squeeze(1).tolist()))
    _plan_cache[:] = [(tuple(t.clone() for t in metadata), block_size), plan]
    return plan


def _gather_visible(cache: Tensor, plan: _DecodePlan) -> Tensor:
    """The single-query requests' cache pages as [r, Hkv, n*bs, D], slots they do not see zeroed.

    Slots past L may never have been written (torch.empty: NaN, inf) or hold a finished request's values, and
    SDPA's 0 weight * NaN is NaN, so they are zeroed in the copy (never multiplied). index_select + index_fill_ on
    rows: about 5x faster on CPU than advanced indexing + a broadcast masked_fill_ (two of each per layer)."""
    _, bs, heads, dim = cache.shape
    r = plan.visible.shape[0]
    rows = cache.index_select(0, plan.blocks).view(r * plan.visible.shape[1], heads * dim)  # [r*n*bs, Hkv*D]
    return rows.index_fill_(0, plan.hidden, 0).view(r, -1, heads, dim).transpose(1, 2)


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
    **kwargs,
) -> Tensor:
    """Causal attention of packed queries over megatron's paged KV cache (CPU stand-in for flash-attn).

    Request i owns queries cu_seqlens_q[i]:cu_seqlens_q[i+1] (lq of them, already in the cache) and the
    first L = seqlens_k[i] cached tokens, stored in blocks block_table[i, :ceil(L / block_size)]; its query j
    sits at position L - lq + j. Single-query requests (decode steps, one-token chunks) share one batched
    SDPA with a key-padding mask, planned once per step (`_step_plan`); multi-token chunks (prefill) go one by
    one. Padding rows (lq = 0) give zeros. Host syncs (`int()`, `.tolist()`) and the loop are harmless on CPU;
    GPUs get `paged_attention.paged_attention`.
    """
    if any(value is not None for value in kwargs.values()):
        raise NotImplementedError(f"CPU paged attention does not support {sorted(kwargs)}")
    scale = getattr(self, "softmax_scale", None)  # as megatron's flash path: MLA sets one, else 1/sqrt(D)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q.squeeze(1)  # [T, Hq, D] packed queries of this step (T = padded token count)
    block_size = k.shape[1]  # k, v: [blocks, block_size, Hkv, D] this layer's cache
    out = torch.zeros_like(q)  # [T, Hq, D]
    plan = _step_plan(cu_seqlens_q, seqlens_k, block_table, block_size)

    if plan.tokens.numel():
        keys, values = (_gather_visible(cache, plan) for cache in (k, v))  # [r, Hkv, n*bs, D] each
        attended = F.scaled_dot_product_attention(
            q[plan.tokens].unsqueeze(2),  # [r, Hq, 1, D]
            keys,
            values,
            attn_mask=plan.visible[:, None, None, :],  # [r, 1, 1, n*bs]
            scale=scale,
            enable_gqa=True,
        )  # [r, Hq, 1, D]
        out[plan.tokens] = attended.squeeze(2)

    for i in plan.prefill:
        start, length = int(cu_seqlens_q[i]), int(seqlens_k[i])
        lq = int(cu_seqlens_q[i + 1]) - start
        blocks = block_table[i, : math.ceil(length / block_size)]  # [n]
        keys = k.index_select(0, blocks).flatten(0, 1)[:length].transpose(0, 1)  # [n, bs, Hkv, D] -> [Hkv, L, D]
        values = v.index_select(0, blocks).flatten(0, 1)[:length].transpose(0, 1)  # [Hkv, L, D]
        positions = torch.arange(length - lq, length)  # [lq] behind the cached prefix
        causal = torch.arange(length)[None, :] <= positions[:, None]  # [lq, L]
        attended = F.scaled_dot_product_attention(
            q[start : start + lq].transpose(0, 1),  # [Hq, lq, D]
            keys,
            values,
            attn_mask=causal,
            scale=scale,
            enable_gqa=True,
        )  # [Hq, lq, D]
        out[start : start + lq] = attended.transpose(0, 1)
    return out.unsqueeze(1)  # [T, 1, Hq, D]
