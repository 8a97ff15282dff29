"""Per-request sampling for the dynamic engine: logit controls, greedy, temperature, min-p, top-k, top-p, with a seed
per request, and the log-probabilities of the sampled tokens.

megatron's controller samples every request from one shared generator, so a request's text would depend on
what else is in the batch. Here each request owns a generator seeded from its own seed and advanced once per
generated token, so the same seed gives the same text whatever the batch, eviction or chunking (the useless
token of a chunked-prefill step is taken greedily and draws nothing). Every TP rank holds the same states, so
all ranks sample the same token without a broadcast.

Order (vLLM's V1 sampler): logit_bias and min_tokens, then repetition / frequency / presence penalties
(`logits_processors`), then greedy takes the argmax, or temperature, min-p, top-k, top-p and a draw. Greedy requests
get the controls too; min-p, top-k and top-p cannot change an argmax.

Log-probabilities are vLLM's default "raw" ones: log_softmax of the logits the model gave (after the adapter),
before any control, penalty or temperature, over the real vocabulary. One log_softmax and one top-k per step for
the requests that asked; requests that did not ask cost nothing more.

A request whose sampling fails (probabilities that are not finite, or any error) fails alone: it is recorded in
`failures`, takes the greedy token this step, and is sampled no more; the serving loop ends it with an error. The
failure is the same on every rank, which computes the same thing from the same state.
"""

from __future__ import annotations

import torch
from megatron.core.inference.text_generation_controllers.text_generation_controller import TextGenerationController

from megatron_bdlora.inference.logits_processors import LogitControls, apply_controls
from megatron_bdlora.inference.prompt_scores import PromptScores, top_logprobs
from megatron_bdlora.inference.requests import GenerationParams, TokenLogprob


class RequestSamplers:
    """Sampling state of every request in the engine, keyed by engine request id."""

    def __init__(self, vocab_size: int, eos_id: int = -1) -> None:
        self.vocab_size = vocab_size  # real vocabulary: logits of the TP padding are never sampled
        self.eos_id = eos_id  # masked with the stop ids until min_tokens (vLLM: even with ignore_eos)
        self.params: dict[int, GenerationParams] = {}
        self.generators: dict[int, torch.Generator] = {}
        self.controls: dict[int, LogitControls] = {}  # requests with logit_bias, penalties or min_tokens
        self.logprobs: dict[int, list[TokenLogprob]] = {}  # requests that asked: one per generated token
        self.record_logits = False  # tests: keep each request's last-token logits per step
        self.logits: dict[int, list[torch.Tensor]] = {}
        self.failures: dict[int, str] = {}  # request id -> why its sampling failed (until take_failures)

    def add(self, request_id: int, params: GenerationParams, seed: int, prompt_ids: tuple[int, ...] = ()) -> None:
        """Start a request's state (`prompt_ids` for repetition_penalty, which counts the prompt)."""
        if not params.greedy:  # torch takes seeds mod 2**64 (a negative seed s is s + 2**64): any int is one
            self.generators[request_id] = torch.Generator().manual_seed(seed % 2**64)
        controls = LogitControls.of(params, prompt_ids, self.eos_id)
        if controls is not None:
            self.controls[request_id] = controls
        if params.logprobs is not None:
            self.logprobs[request_id] = []
        self.params[request_id] = params

    def remove(self, request_id: int) -> None:
        self.params.pop(request_id, None)
        self.generators.pop(request_id, None)
        self.controls.pop(request_id, None)
        self.logprobs.pop(request_id, None)

    def token_logprobs(self, request_id: int) -> list[TokenLogprob]:
        """The generated tokens' log-probabilities so far, in order (empty if the request did not ask)."""
        return self.logprobs.get(request_id, [])

    def sample(self, request_ids: list[int], logits: torch.Tensor, chunked_prefill_id: int) -> torch.Tensor:
        """Next token per request: logits [requests, padded vocab] -> [requests] (int64)."""
        raw = logits[:, : self.vocab_size].float()  # [requests, vocab]
        rows = [i for i, rid in enumerate(request_ids) if rid != chunked_prefill_id]  # the others' tokens are dropped
        controlled = [(i, self.controls[request_ids[i]]) for i in rows if request_ids[i] in self.controls]
        logits = apply_controls(raw, controlled) if controlled else raw
        tokens = logits.argmax(dim=-1)
        for i in rows:
            rid = request_ids[i]
            if self.record_logits:
                self.logits.setdefault(rid, []).append(raw[i].clone())
            p = self.params.get(rid)
            if p is None or p.greedy:
                continue
            try:
                tokens[i] = _sample_one(logits[i].cpu(), p, self.generators[rid])  # host generators: any device
            except Exception as err:  # this request only: it keeps the greedy token and is sampled no more
                self.failures[rid] = (f"sampling failed (temperature={p.temperature}, top_p={p.top_p}, "
                                      f"top_k={p.top_k}, min_p={p.min_p}): {err}")
                self.remove(rid)
        self._record_logprobs(request_ids, rows, raw, tokens)
        if controlled:
            sampled = tokens.tolist()
            for i, controls in controlled:
                controls.count(sampled[i])
        return tokens

    def _record_logprobs(
        self, request_ids: list[int], rows: list[int], raw: torch.Tensor, tokens: torch.Tensor
    ) -> None:
        """Each asking request's sampled token: its raw log-probability and the top alternatives (one log_softmax)."""
        asking = [i for i in rows if request_ids[i] in self.logprobs]
        if not asking:
            return
        index = torch.tensor(asking, device=raw.device)
        ks = [self.params[request_ids[i]].logprobs for i in asking]
        chosen = tokens[index]
        for i, entry in zip(asking, top_logprobs(raw[index], chosen, ks)):
            self.logprobs[request_ids[i]].append(entry)

    def take_failures(self) -> dict[int, str]:
        """The requests whose sampling failed since the last call, with the reason."""
        failures, self.failures = self.failures, {}
        return failures


def filtered_logits(logits: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    """[vocab] logits after temperature, min-p, top-k and top-p (vLLM's order): -inf where a token may not be drawn.

    In float64 and shifted to a maximum of 0 before the division, so that any temperature > 0 gives finite
    probabilities (a tiny one: the argmax with probability 1) instead of inf - inf = nan."""
    logits = (logits.double() - logits.max()) / p.temperature
    if p.min_p > 0.0:  # tokens less likely than min_p times the most likely one (after temperature)
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _sample_one(logits: torch.Tensor, p: GenerationParams, gen: torch.Generator) -> torch.Tensor:
    """One token drawn from the filtered [vocab] logits; ValueError if the probabilities are not finite."""
    probs = filtered_logits(logits, p).softmax(-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("the token probabilities are not finite")
    return torch.multinomial(probs, 1, generator=gen)[0]


class SeededSamplingController(TextGenerationController):
    """megatron's controller with its sampling step replaced by `RequestSamplers`, and the prompt positions of the
    requests that asked for prompt log-probabilities scored from the same forward pass (`PromptScores`)."""

    samplers: RequestSamplers
    prompt_scores: PromptScores

    def _dynamic_step_context_init(self, *args, **kwargs):
        """megatron's step set-up, then which prompt positions' logits this step keeps (before the forward)."""
        out = super()._dynamic_step_context_init(*args, **kwargs)
        self.prompt_scores.plan_step(self.inference_wrapped_model.inference_context)
        return out

    def _dynamic_step_sample_bookkeeping(self) -> None:
        """Nothing to bucket: sampling is per request."""

    def _dynamic_step_sample_logits(self, logits: torch.Tensor) -> None:
        context = self.inference_wrapped_model.inference_context
        active = context.total_request_count - context.paused_request_count
        if context.materialize_only_last_token_logits:
            rows = logits.squeeze(0)  # [active requests + kept prompt positions, vocab]
            self.prompt_scores.record(rows, active)
            last = rows[:active]
        else:
            last = context.last_token_logits(logits)
        request_ids = context.request_ids[context.paused_request_count : context.total_request_count].tolist()
        tokens = self.samplers.sample(request_ids, last, context.chunked_prefill_request_id)
        self._sampled_tokens_cuda[: len(request_ids)] = tokens
