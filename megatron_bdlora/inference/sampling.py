"""Per-request sampling for the dynamic engine: greedy, temperature, top-k, top-p, with a seed per request.

megatron's controller samples every request from one shared generator, so a request's text would depend on
what else is in the batch. Here each request owns a generator seeded from its own seed and advanced once per
generated token, so the same seed gives the same text whatever the batch, eviction or chunking (the useless
token of a chunked-prefill step is taken greedily and draws nothing). Every TP rank holds the same states, so
all ranks sample the same token without a broadcast.

A request whose sampling fails (probabilities that are not finite, or any error) fails alone: it is recorded in
`failures`, takes the greedy token this step, and is sampled no more; the serving loop ends it with an error. The
failure is the same on every rank, which computes the same thing from the same state.
"""

from __future__ import annotations

import torch
from megatron.core.inference.text_generation_controllers.text_generation_controller import TextGenerationController

from megatron_bdlora.inference.requests import GenerationParams


class RequestSamplers:
    """Sampling state of every request in the engine, keyed by engine request id."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size  # real vocabulary: logits of the TP padding are never sampled
        self.params: dict[int, GenerationParams] = {}
        self.generators: dict[int, torch.Generator] = {}
        self.record_logits = False  # tests: keep each request's last-token logits per step
        self.logits: dict[int, list[torch.Tensor]] = {}
        self.failures: dict[int, str] = {}  # request id -> why its sampling failed (until take_failures)

    def add(self, request_id: int, params: GenerationParams, seed: int) -> None:
        self.params[request_id] = params
        if not params.greedy:  # torch takes seeds mod 2**64 (a negative seed s is s + 2**64): any int is one
            self.generators[request_id] = torch.Generator().manual_seed(seed % 2**64)

    def remove(self, request_id: int) -> None:
        self.params.pop(request_id, None)
        self.generators.pop(request_id, None)

    def sample(self, request_ids: list[int], logits: torch.Tensor, chunked_prefill_id: int) -> torch.Tensor:
        """Next token per request: logits [requests, padded vocab] -> [requests] (int64)."""
        logits = logits[:, : self.vocab_size].float()
        tokens = logits.argmax(dim=-1)
        for i, rid in enumerate(request_ids):
            if self.record_logits and rid != chunked_prefill_id:
                self.logits.setdefault(rid, []).append(logits[i].clone())
            p = self.params.get(rid)
            if p is None or p.greedy or rid == chunked_prefill_id:
                continue
            try:
                tokens[i] = _sample_one(logits[i].cpu(), p, self.generators[rid])  # host generators: any device
            except Exception as err:  # this request only: it keeps the greedy token and is sampled no more
                self.failures[rid] = (f"sampling failed (temperature={p.temperature}, top_p={p.top_p}, "
                                      f"top_k={p.top_k}): {err}")
                self.remove(rid)
        return tokens

    def take_failures(self) -> dict[int, str]:
        """The requests whose sampling failed since the last call, with the reason."""
        failures, self.failures = self.failures, {}
        return failures


def _sample_one(logits: torch.Tensor, p: GenerationParams, gen: torch.Generator) -> torch.Tensor:
    """One token from [vocab] logits with temperature, then top-k, then top-p (nucleus) filtering.

    In float64 and shifted to a maximum of 0 before the division, so that any temperature > 0 gives finite
    probabilities (a tiny one: the argmax with probability 1) instead of inf - inf = nan; ValueError otherwise."""
    logits = (logits.double() - logits.max()) / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("the token probabilities are not finite")
    return torch.multinomial(probs, 1, generator=gen)[0]


class SeededSamplingController(TextGenerationController):
    """megatron's controller with its sampling step replaced by `RequestSamplers` (everything else as is)."""

    samplers: RequestSamplers

    def _dynamic_step_sample_bookkeeping(self) -> None:
        """Nothing to bucket: sampling is per request."""

    def _dynamic_step_sample_logits(self, logits: torch.Tensor) -> None:
        context = self.inference_wrapped_model.inference_context
        if context.materialize_only_last_token_logits:
            last = logits.squeeze(0)  # [active requests, padded vocab]
        else:
            last = context.last_token_logits(logits)
        request_ids = context.request_ids[context.paused_request_count : context.total_request_count].tolist()
        tokens = self.samplers.sample(request_ids, last, context.chunked_prefill_request_id)
        self._sampled_tokens_cuda[: len(request_ids)] = tokens
