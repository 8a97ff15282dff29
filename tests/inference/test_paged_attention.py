"""The attention-path decision of inference/cpu_fallbacks.py and the vectorised paged attention of
inference/paged_attention.py (flash-attn's stand-in on a GPU without it), checked on CPU in float64 against the
CPU stand-in and an independent dense reference."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_bdlora.inference import cpu_fallbacks
from megatron_bdlora.inference.paged_attention import paged_attention

HQ, HKV, D = 4, 2, 8


# ---- the decision -------------------------------------------------------------------------------------------


def test_decision_table():
    choose = cpu_fallbacks.choose_attention_path
    assert choose(cuda_available=True, flash_attn_ok=True) == cpu_fallbacks.FLASH_ATTN == "flash-attn"
    assert choose(cuda_available=True, flash_attn_ok=False) == cpu_fallbacks.TORCH_PAGED_CUDA
    assert cpu_fallbacks.TORCH_PAGED_CUDA == "torch-paged (CUDA, flash-attn missing)"
    assert choose(cuda_available=False, flash_attn_ok=True) == cpu_fallbacks.TORCH_CPU == "torch-cpu"
    assert choose(cuda_available=False, flash_attn_ok=False) == cpu_fallbacks.TORCH_CPU


def test_flash_attn_check_follows_megatrons_condition(monkeypatch):
    from megatron.core.transformer import attention

    monkeypatch.setattr(attention, "HAVE_FA3", True)
    assert cpu_fallbacks._flash_attn_ok()
    monkeypatch.setattr(attention, "HAVE_FA3", False)
    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)
    assert not cpu_fallbacks._flash_attn_ok()


@pytest.fixture
def megatron_attention(monkeypatch):
    """megatron's attention module with the two names the decision may patch restored after the test."""
    from megatron.core.transformer import attention

    monkeypatch.setattr(attention, "is_fa_min_version", attention.is_fa_min_version)
    monkeypatch.setattr(attention.Attention, "flash_decode_and_prefill", attention.Attention.flash_decode_and_prefill)
    monkeypatch.setattr(cpu_fallbacks, "_applied", None)
    return attention


def test_cuda_without_flash_attn_patches_only_attention_with_the_vectorised_path(
    megatron_attention, monkeypatch, caplog
):
    from megatron.core.inference.contexts import dynamic_context
    from megatron.core.inference.engines import dynamic_engine

    monkeypatch.setattr(cpu_fallbacks, "_cuda_available", lambda: True)
    monkeypatch.setattr(cpu_fallbacks, "_flash_attn_ok", lambda: False)
    untouched = (
        dynamic_context.triton_append_key_value_cache, torch.cuda.Event, torch.cuda.synchronize,
        dynamic_engine.range_push, dynamic_engine.range_pop, torch.cuda.nvtx.range_push,
    )
    assert cpu_fallbacks.attention_path_here() == cpu_fallbacks.TORCH_PAGED_CUDA
    with caplog.at_level(logging.INFO, logger=cpu_fallbacks.__name__):
        assert cpu_fallbacks.apply_inference_fallbacks() == cpu_fallbacks.TORCH_PAGED_CUDA
        assert cpu_fallbacks.apply_inference_fallbacks() == cpu_fallbacks.TORCH_PAGED_CUDA  # idempotent
    assert megatron_attention.Attention.flash_decode_and_prefill is paged_attention
    assert megatron_attention.is_fa_min_version("2.7.3")
    assert untouched == (
        dynamic_context.triton_append_key_value_cache, torch.cuda.Event, torch.cuda.synchronize,
        dynamic_engine.range_push, dynamic_engine.range_pop, torch.cuda.nvtx.range_push,
    )
    records = [r for r in caplog.records if r.name == cpu_fallbacks.__name__]
    assert len(records) == 1 and cpu_fallbacks.TORCH_PAGED_CUDA in records[0].getMessage()


def test_cuda_with_flash_attn_patches_nothing(megatron_attention, monkeypatch):
    before = (megatron_attention.is_fa_min_version, megatron_attention.Attention.flash_decode_and_prefill)
    monkeypatch.setattr(cpu_fallbacks, "_cuda_available", lambda: True)
    monkeypatch.setattr(cpu_fallbacks, "_flash_attn_ok", lambda: True)
    assert cpu_fallbacks.apply_inference_fallbacks() == cpu_fallbacks.FLASH_ATTN
    assert (megatron_attention.is_fa_min_version, megatron_attention.Attention.flash_decode_and_prefill) == before


# ---- the vectorised attention ---------------------------------------------------------------------------------

# (L cached tokens seen, lq queries this step): a whole prompt, chunks after a cached prefix, single-token
# prompts and decodes, then padding requests (lq = 0, L = 0)
MIXED = [(7, 7), (12, 5), (9, 1), (1, 1), (33, 16), (20, 1), (5, 2), (0, 0), (0, 0)]
DECODE = [(9, 1), (1, 1), (40, 1), (17, 1), (0, 0), (0, 0)]
PADDING_TOKENS = 3


def paged_batch(requests, block_size, seed, width=None, n_blocks=None, padding_tokens=PADDING_TOKENS):
    """A packed step over a paged cache like megatron's: random non-contiguous pages, -1 in unused table
    entries, NaN in every slot no request owns; returns the call's arguments and each request's contiguous K/V."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length for length, _ in requests])
    q_lens = torch.tensor([lq for _, lq in requests])
    T = int(q_lens.sum()) + padding_tokens
    width = width or math.ceil(int(lengths.max()) / block_size) + 1  # unused columns too
    used = [math.ceil(length / block_size) for length, _ in requests]
    n_blocks = n_blocks or sum(used) + 5  # spare pages, never written
    page_ids = torch.randperm(n_blocks, generator=gen)
    k_cache = torch.full((n_blocks, block_size, HKV, D), float("nan"), dtype=torch.float64)
    v_cache = torch.full_like(k_cache, float("nan"))
    block_table = torch.full((len(requests), width), -1, dtype=torch.int32)
    contiguous = []
    taken = 0
    for i, (length, _) in enumerate(requests):
        keys = torch.randn(length, HKV, D, generator=gen, dtype=torch.float64)
        values = torch.randn(length, HKV, D, generator=gen, dtype=torch.float64)
        pages = page_ids[taken : taken + used[i]]
        taken += used[i]
        block_table[i, : used[i]] = pages.int()
        for slot in range(length):
            k_cache[pages[slot // block_size], slot % block_size] = keys[slot]
            v_cache[pages[slot // block_size], slot % block_size] = values[slot]
        contiguous.append((keys, values))
    cu_q = torch.zeros(len(requests) + 1, dtype=torch.int32)
    cu_q[1:] = torch.cumsum(q_lens, 0)
    cu_k = torch.zeros(len(requests) + 1, dtype=torch.int32)
    cu_k[1:] = torch.cumsum(lengths, 0)
    q = torch.randn(T, 1, HQ, D, generator=gen, dtype=torch.float64)
    args = dict(
        q=q, k=k_cache, v=v_cache, max_seqlen_q=int(q_lens.max()), max_seqlen_k=int(lengths.max()),
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqlens_k=lengths.int(), block_table=block_table,
    )
    return args, contiguous


def dense_reference(args, contiguous, scale):
    """softmax(Q K^T * scale + causal mask) V per request and head from the contiguous K/V, zeros elsewhere."""
    q = args["q"].squeeze(1)  # [T, Hq, D]
    out = torch.zeros_like(q)
    cu = args["cu_seqlens_q"].tolist()
    for i, (keys, values) in enumerate(contiguous):
        start, lq, length = cu[i], cu[i + 1] - cu[i], keys.shape[0]
        if lq == 0:
            continue
        positions = torch.arange(length - lq, length)  # [lq]
        bias = torch.where(torch.arange(length)[None, :] <= positions[:, None], 0.0, float("-inf"))  # [lq, L]
        for h in range(HQ):
            kv = h // (HQ // HKV)
            scores = q[start : start + lq, h] @ keys[:, kv].T * scale + bias  # [lq, L]
            out[start : start + lq, h] = torch.softmax(scores, dim=-1) @ values[:, kv]
    return out.unsqueeze(1)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("requests,is_decode_only", [(MIXED, False), (DECODE, True), (DECODE, False)])
@pytest.mark.parametrize("softmax_scale", [None, 0.3])
def test_vectorised_paged_attention_matches_the_cpu_path_and_a_dense_reference(
    block_size, requests, is_decode_only, softmax_scale
):
    args, contiguous = paged_batch(requests, block_size, seed=block_size)
    layer = SimpleNamespace(softmax_scale=softmax_scale)
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    expected = dense_reference(args, contiguous, scale)
    assert torch.isfinite(expected).all()

    cpu = cpu_fallbacks.paged_attention(layer, **args, is_decode_only=is_decode_only)
    close(cpu, expected)  # the reference itself agrees with the path the engine tests cover end to end
    tight = paged_attention(layer, **args, is_decode_only=is_decode_only)
    close(tight, cpu)
    close(tight, expected)
    static = paged_attention(layer, **args, is_decode_only=is_decode_only, static=True)
    close(static, expected)
    # what megatron's graphed metadata passes: max_seqlen_q = 1 or max(2, tokens), max_seqlen_k = max length
    T, width = args["q"].shape[0], args["block_table"].shape[1]
    graphed = dict(args, max_seqlen_q=1 if is_decode_only else max(2, T), max_seqlen_k=width * block_size)
    close(paged_attention(layer, **graphed, is_decode_only=is_decode_only), expected)
    # lengths as tensors: static sizes rather than a host read
    as_tensors = dict(args, max_seqlen_q=torch.tensor(args["max_seqlen_q"]), max_seqlen_k=torch.tensor(width))
    close(paged_attention(layer, **as_tensors, is_decode_only=is_decode_only), expected)


def test_vectorised_paged_attention_has_no_data_dependent_shapes_or_host_reads():
    """On the meta device any .item() / .tolist() / nonzero / boolean index fails: the static variant runs there."""
    args, _ = paged_batch(MIXED, 4, seed=0)
    meta = {name: value.to("meta") if isinstance(value, torch.Tensor) else value for name, value in args.items()}
    layer = SimpleNamespace(softmax_scale=None)
    for is_decode_only in (False, True):
        out = paged_attention(layer, **meta, is_decode_only=is_decode_only, static=True)
        assert out.shape == args["q"].shape and out.device.type == "meta"
        out = paged_attention(layer, **meta, is_decode_only=is_decode_only)  # tight sizes from the host ints
        assert out.shape == args["q"].shape
    with pytest.raises(Exception):  # the CPU stand-in reads lengths on the host
        cpu_fallbacks.paged_attention(layer, **meta, is_decode_only=False)


def test_vectorised_paged_attention_rejects_what_it_does_not_implement():
    args, _ = paged_batch(DECODE, 4, seed=0)
    layer = SimpleNamespace(softmax_scale=None)
    with pytest.raises(NotImplementedError):
        paged_attention(layer, **args, is_decode_only=True, sinks=torch.zeros(HQ))
    with pytest.raises(NotImplementedError):
        paged_attention(layer, **dict(args, v=None), is_decode_only=True)


def moved(args: dict, device: str, dtype: torch.dtype) -> dict:
    """The call's arguments on `device`, floating tensors (q and the cache) as `dtype`."""
    def move(x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(device, dtype) if torch.is_floating_point(x) else x.to(device)

    return {name: move(value) for name, value in args.items()}


def static_decode_replay(device: str, graphs: bool) -> None:
    """The static decode path computed for one step's tensors, then re-run (or its CUDA graph replayed) after
    another step's lengths, pages and queries are copied into the same tensors: right for both."""
    layer = SimpleNamespace(softmax_scale=None)
    first = [(9, 1), (1, 1), (40, 1), (17, 1), (0, 0), (0, 0)]
    second = [(3, 1), (25, 1), (12, 1), (44, 1), (30, 1), (0, 0)]  # longer, one more request, other pages
    batches = [  # same shapes: 8 tokens, 6 table rows of 12 pages, 64 pages
        paged_batch(
            requests, 4, seed=i, width=12, n_blocks=64, padding_tokens=8 - len(requests) + requests.count((0, 0))
        )
        for i, requests in enumerate((first, second))
    ]
    (args, contiguous), (new_args, new_contiguous) = batches
    static_args = moved(args, device, torch.float32)

    def run():
        return paged_attention(layer, **static_args, is_decode_only=True, static=True)

    if graphs:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()  # warm-up outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        graph.replay()
    else:
        out = run()
    expected = dense_reference(args, contiguous, D**-0.5).float()
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-5)
    for name, value in moved(new_args, device, torch.float32).items():  # a later step: new data in the captured tensors
        if isinstance(value, torch.Tensor):
            static_args[name].copy_(value)
    if graphs:
        graph.replay()
    else:
        out = run()
    expected = dense_reference(new_args, new_contiguous, D**-0.5).float()
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_static_decode_path_reruns_right_on_new_lengths_in_the_same_tensors():
    static_decode_replay("cpu", graphs=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_gpu_no_host_sync_and_a_captured_decode_graph_replays_for_other_lengths():
    static_decode_replay("cuda", graphs=True)
    layer = SimpleNamespace(softmax_scale=None)
    for requests, is_decode_only in ((MIXED, False), (DECODE, True)):
        args, contiguous = paged_batch(requests, 16, seed=3)
        on_gpu = moved(args, "cuda", torch.float64)
        expected = dense_reference(args, contiguous, D**-0.5)
        torch.cuda.set_sync_debug_mode("error")  # any host sync raises
        try:
            outs = [paged_attention(layer, **on_gpu, is_decode_only=is_decode_only, static=static)
                    for static in (None, True)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for out in outs:
            torch.testing.assert_close(out.cpu(), expected, rtol=1e-10, atol=1e-12)
        # bf16 (SDPA's fused kernels) against the float64 reference
        bf16 = moved(args, "cuda", torch.bfloat16)
        out = paged_attention(layer, **bf16, is_decode_only=is_decode_only).double().cpu()
        torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)


def test_cpu_attention_replans_whenever_a_steps_metadata_changes():
    """The CPU path plans once per step and reuses the plan while the metadata is unchanged: successive steps on
    the same metadata tensors rewritten in place (as megatron does), and new tensors, each match the reference."""
    layer = SimpleNamespace(softmax_scale=None)
    first, first_kv = paged_batch(DECODE, 4, seed=1)
    second, second_kv = paged_batch([(length + 3, lq) for length, lq in DECODE], 4, seed=2, width=13, n_blocks=40)
    steps = [(first, first_kv), (second, second_kv), (first, first_kv)]
    persistent = {name: first[name].clone() for name in ("cu_seqlens_q", "seqlens_k")}
    persistent["block_table"] = torch.full((len(DECODE), 13), -1, dtype=torch.int32)
    for args, contiguous in steps:
        expected = dense_reference(args, contiguous, D**-0.5)
        close(cpu_fallbacks.paged_attention(layer, **args, is_decode_only=True), expected)
        for name, tensor in persistent.items():  # megatron's way: the same tensors, new contents
            tensor.fill_(-1)
            tensor[..., : args[name].shape[-1]] = args[name]
        in_place = dict(args, **persistent)
        close(cpu_fallbacks.paged_attention(layer, **in_place, is_decode_only=True), expected)
