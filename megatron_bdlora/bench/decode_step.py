"""Our engine's no-adapter decode step against transformers' on the same batch (issue 23's lean-step check).

Why a benchmark of its own: the serving benchmark's tok/s mixes prefill, scheduling and decode, while the question
here is narrower - what one decode step of megatron-core's dynamic engine (with our CPU attention and LoRA layers,
no adapter used) costs against a plain transformers forward of the same requests with its KV cache. Both models are
built from the same HF directory in this process with the same thread count; after both prefill the same prompts,
steps alternate one by one (ours, theirs, ours, ...), so load on the machine hits both alike, and every pair gives
one ratio. The table reports medians and the p10-p90 spread of all pairs, never the best one.

transformers' step: `model(next tokens, attention_mask, position_ids, past_key_values)` on a left-padded batch, as
`generate` runs it, plus the greedy argmax. Ours: `ServingLoop.step()` with every request decoding (it includes the
engine's bookkeeping and sampling, which is part of what a step costs).
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any

import torch
from transformers import LlamaForCausalLM

from megatron_bdlora.bench.workload import percentile
from megatron_bdlora.inference.requests import GenerationParams

# transformers >= 5.2x names the KV cache argument and output `cache` (`past_key_values` is deprecated)
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    return output.cache if CACHE_ARG == "cache" else output.past_key_values


class HFDecoder:
    """A left-padded batch decoded by a transformers causal LM one step at a time (greedy), with its KV cache."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], pad_id: int) -> None:
        self.model = model
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=self.mask, position_ids=self._positions(), use_cache=True)
        self.cache = _cache_of(out)
        self.next = out.logits[:, -1].argmax(-1)

    def _positions(self) -> torch.Tensor:
        return (self.mask.cumsum(-1) - 1).clamp(min=0)

    def step(self) -> torch.Tensor:
        """One greedy decode step of every row; returns the tokens it consumed."""
        consumed = self.next
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        with torch.inference_mode():
            out = self.model(input_ids=consumed[:, None], attention_mask=self.mask,
                             position_ids=self._positions()[:, -1:], use_cache=True, **{CACHE_ARG: self.cache})
        self.cache = _cache_of(out)
        self.next = out.logits[:, -1].argmax(-1)
        return consumed


def paired_steps(loop: Any, hf: HFDecoder, prompts: list[list[int]], pairs: int, warmup: int = 3) -> dict:
    """Alternate one engine step and one transformers step `pairs` times (after `warmup` untimed pairs) with every
    request of `prompts` decoding in the engine; per-step seconds of both and the greedy tokens of both."""
    params = GenerationParams(max_tokens=pairs + warmup + 8, temperature=0.0, ignore_eos=True)
    queues = [loop.submit(p, None, params)[1] for p in prompts]
    for _ in range(50):  # prefill (chunks), until every request has its first token and decodes
        loop.step()
        ctx = loop.engine.context
        if ctx.total_request_count == len(prompts) and bool(ctx.is_decode_only()):
            break
    else:
        raise RuntimeError("the engine did not reach a decode-only step with every request within 50 steps")
    ours, theirs, hf_tokens = [], [], []
    for i in range(warmup + pairs):
        t0 = time.perf_counter()
        loop.step()
        t1 = time.perf_counter()
        hf_tokens.append(hf.step())
        t2 = time.perf_counter()
        if i >= warmup:
            ours.append(t1 - t0)
            theirs.append(t2 - t1)
    tokens = [[] for _ in prompts]
    while loop.inflight():
        loop.step()
    for i, q in enumerate(queues):
        while not q.empty():
            tokens[i] += q.get_nowait().token_ids
    hf_by_request = torch.stack(hf_tokens, dim=1).tolist()  # [requests, steps]
    return dict(ours_s=ours, transformers_s=theirs, ours_tokens=tokens, transformers_tokens=hf_by_request)


def summary(run: dict) -> dict:
    """Medians and p10-p90 of both step times and of the per-pair ratio ours / transformers."""
    ratios = [a / b for a, b in zip(run["ours_s"], run["transformers_s"])]

    def stats(values: list[float], scale: float) -> dict:
        return dict(median=statistics.median(values) * scale, p10=percentile(values, 10) * scale,
                    p90=percentile(values, 90) * scale)

    n = min(len(t) for t in run["transformers_tokens"])
    same = sum(a[:n] == b[:n] for a, b in zip(run["ours_tokens"], run["transformers_tokens"]))
    return dict(pairs=len(ratios), ours_ms=stats(run["ours_s"], 1e3), transformers_ms=stats(run["transformers_s"], 1e3),
                ratio=stats(ratios, 1.0), requests=len(run["ours_tokens"]), requests_with_equal_greedy_tokens=same,
                compared_tokens_per_request=n)
