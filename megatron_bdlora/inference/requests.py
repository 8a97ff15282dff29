"""What crosses the boundary between the HTTP front end (rank 0) and the serving loop: requests and token events.

Plain dataclasses, picklable, so that the serving loop can broadcast them to every TP rank unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as vLLM and torch.Generator take it
MAX_LOGPROBS = 20  # top alternatives per position, vLLM's default cap (max_logprobs)


class AdapterConflictError(RuntimeError):
    """A load or unload of an adapter name while another operation on that name is in progress (the server answers
    409): operations on one name are serialised, never interleaved."""

    def __init__(self, name: str, operation: str) -> None:
        super().__init__(f"adapter {name!r}: a {operation} of this name is in progress; retry when it is done")
        self.name = name
        self.operation = operation

    def __reduce__(self) -> tuple:  # picklable with its fields (exceptions pickle their message args by default)
        return type(self), (self.name, self.operation)


class ParamError(ValueError):
    """A request setting out of range, with the request field it is about (`param`: a GenerationParams field, or
    "prompt" for the prompt itself), so that the server's 400 names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GenerationParams:
    """Per-request decoding settings (OpenAI / vLLM meanings); validated by `check()` before a request is queued."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = -1  # -1 or 0 = off (vLLM's -1)
    seed: int | None = None  # the same seed (and prompt, adapter) gives the same text
    stop: tuple[str, ...] = ()  # stop strings: output ends before the first occurrence
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the output (EOS always does unless ignore_eos)
    ignore_eos: bool = False
    # issue 24: log-probabilities and sampling controls (OpenAI / vLLM meanings; defaults = off)
    logprobs: int | None = None  # None: none; k >= 0: each generated token's logprob and its top-k alternatives
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's logprob (the first one None) + top-k
    presence_penalty: float = 0.0  # OpenAI: minus this from the logits of tokens generated at least once
    frequency_penalty: float = 0.0  # OpenAI: minus this times the count of each generated token
    repetition_penalty: float = 1.0  # vLLM / transformers: over prompt + generated tokens (1 = off)
    min_tokens: int = 0  # EOS and stop ids are not sampled before this many generated tokens
    min_p: float = 0.0  # drop tokens with probability < min_p * the top probability (0 = off)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    include_stop_str_in_output: bool = False  # vLLM: keep the stop string that ended the text
    skip_special_tokens: bool = True  # vLLM: leave special tokens out of the text

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def check(self, prompt_tokens: int, max_model_len: int, vocab_size: int | None = None) -> None:
        """ParamError naming the field and the allowed range (the server answers 400 with it); `vocab_size` (if
        given) bounds the token ids of logit_bias."""
        self._check_lengths(prompt_tokens, max_model_len)
        if not 0.0 <= self.temperature <= 2.0:
            raise ParamError("temperature", f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k not in (-1, 0)):
            raise ParamError("top_k", f"top_k must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        low, high = SEED_RANGE
        if self.seed is not None and (not _is_int(self.seed) or not low <= self.seed <= high):
            raise ParamError("seed", f"seed must be an integer in [-2**63, 2**63 - 1] (int64), got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ParamError(name, f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ParamError(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty < math.inf:  # vLLM: finite and > 0 (no upper bound)
            raise ParamError("repetition_penalty", f"repetition_penalty must be finite and > 0, "
                                                   f"got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ParamError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        self._check_logit_bias(vocab_size)

    def _check_lengths(self, prompt_tokens: int, max_model_len: int) -> None:
        """max_tokens >= 1, or 0 to only score the prompt (prompt_logprobs set); min_tokens in [0, max_tokens]; the
        prompt and one generated token at least within the context (the engine computes one even to score)."""
        lowest = 0 if self.prompt_logprobs is not None else 1
        if not _is_int(self.max_tokens) or self.max_tokens < lowest:
            raise ParamError("max_tokens", f"max_tokens must be an integer >= 1 (0 only with prompt_logprobs, to score "
                                           f"the prompt without generating), got {self.max_tokens!r}")
        if prompt_tokens < 1:
            raise ParamError("prompt", "the prompt is empty (0 tokens)")
        if prompt_tokens + max(self.max_tokens, 1) > max_model_len:
            raise ParamError(
                "max_tokens",
                f"prompt ({prompt_tokens} tokens) + max_tokens ({self.max_tokens}, at least 1) exceeds the context "
                f"length max_model_len={max_model_len}",
            )
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ParamError("min_tokens", f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                                           f"got {self.min_tokens!r}")

    def _check_logit_bias(self, vocab_size: int | None) -> None:
        for token, bias in self.logit_bias:
            if not _is_int(token) or token < 0 or (vocab_size is not None and token >= vocab_size):
                within = f" < {vocab_size}" if vocab_size is not None else ""
                raise ParamError("logit_bias", f"logit_bias token ids must be integers >= 0{within}, got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ParamError("logit_bias", f"logit_bias values must be in [-100, 100], got {bias} for {token}")


def _is_int(value: object) -> bool:
    """An integer and not a bool (JSON true must not pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt (token ids) for one adapter (None = the base model)."""

    request_id: int
    prompt_ids: tuple[int, ...]
    adapter: str | None
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probability: the chosen (or prompt) token's, and the top alternatives, most likely first
    (from the same logits the engine samples from, after the adapter and before penalties and temperature)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), descending; as many as the request asked


@dataclass(frozen=True)
class TokenEvent:
    """What one engine step produced for one request (rank 0 only).

    token_ids are the *new* visible tokens (stop strings and stop ids already cut off); `text` is their
    detokenised text delta; the last event of a request has finished=True and a finish_reason:
    'stop' (EOS, stop id or stop string), 'length' (max_tokens reached), 'abort' (cancelled or adapter
    unloaded) or 'error' (with `error` saying why).
    """

    request_id: int
    token_ids: tuple[int, ...]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # visible tokens so far, including these
    logprobs: tuple[TokenLogprob, ...] = ()  # with params.logprobs: one per token of `token_ids`, in order
    # with params.prompt_logprobs, on the request's first event only: one per prompt token, the first None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
