"""The OpenAI / vLLM request protocol: request bodies (pydantic, strictly typed) and the answers' JSON shapes.

Every top-level field a body may carry is declared here; anything else is refused by the front end with a 400 that
names it (a field this server does not implement is never silently ignored). Log-probabilities are reported in
OpenAI's shapes (completions' legacy `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`; chat's
`content[]`) and vLLM's `prompt_logprobs` extension; a token is shown as the tokenizer decodes it alone, as vLLM
does, and -inf as -9999.0, as OpenAI and vLLM do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict

from megatron_bdlora.inference.requests import TokenLogprob

# Fields of OpenAI / vLLM this server does not implement, with the values that mean "off" (accepted, as the
# default): any other value is a 400 naming the field. A field in neither this table nor a body is "unknown" (400).
UNSUPPORTED_UNLESS: dict[str, tuple] = {
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,), "structured_outputs": (None,),
    "chat_template": (None,), "chat_template_kwargs": (None, {}), "continue_final_message": (None, False),
    "echo": (None, False),  # chat only (vLLM's "prepend the last message"); completions implement echo
    "allowed_token_ids": (None,), "bad_words": (None, []), "truncate_prompt_tokens": (None,),
    "logprob_token_ids": (None,), "return_tokens_as_token_ids": (None, False), "return_token_ids": (None, False),
    "spaces_between_special_tokens": (None, True), "prompt_embeds": (None,), "documents": (None,),
    "priority": (None, 0), "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto"),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
}
MIN_LOGPROB = -9999.0  # what OpenAI and vLLM send for a log-probability of -inf (JSON has no infinity)


# ---------------------------------------------------------------------------------------------------------------
# request bodies


class _Body(BaseModel):
    """Strict JSON types (a string is not a number, a bool not an int); unknown fields are kept to be checked."""

    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM: usage on every chunk too (with include_usage)


class SamplingRequest(_Body):
    """What completions and chat share: the model, decoding settings and streaming."""

    model: str | None = None  # None: the base model
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are given
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension (extra_body in the openai client)
    min_p: float | None = None  # vLLM extension
    seed: int | None = None  # with n > 1, choice j uses seed + j (vLLM's rule)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    include_stop_str_in_output: bool | None = None  # vLLM extension
    ignore_eos: bool | None = None  # vLLM extension
    min_tokens: int | None = None  # vLLM extension
    skip_special_tokens: bool | None = None  # vLLM extension
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM extension
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    prompt_logprobs: int | None = None  # vLLM extension
    n: int | None = None
    best_of: int | None = None  # only None or n (vLLM's V1 engine has no best_of)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI does for serving


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None  # k: the chosen token's logprob and the top k
    add_special_tokens: bool | None = None  # vLLM extension (string prompts; the tokenizer's default: True)


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    logprobs: bool | None = None
    top_logprobs: int | None = None  # 0..20, with logprobs: true
    add_generation_prompt: bool | None = None  # vLLM extension (default True: open the assistant's turn)


class TokenizeRequest(_Body):
    """vLLM's POST /tokenize: a prompt, or messages put through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # vLLM's defaults: True for a prompt, False for messages
    add_generation_prompt: bool | None = None  # messages only; default True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class LoadLoRARequest(_Body):
    lora_name: str
    lora_path: str


class UnloadLoRARequest(_Body):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's optional id; accepted and ignored


# ---------------------------------------------------------------------------------------------------------------
# answer shapes


@dataclass(frozen=True)
class Endpoint:
    """What differs between completions and chat: the prompt's field, the default max_tokens and the answers'
    shape (completions: `text`; chat: `message` / `delta`)."""

    chat: bool

    @property
    def prompt_field(self) -> str:
        return "messages" if self.chat else "prompt"

    @property
    def logprobs_field(self) -> str:
        """The request field that sets how many top alternatives are returned."""
        return "top_logprobs" if self.chat else "logprobs"

    @property
    def default_max_tokens(self) -> int | None:
        """OpenAI's defaults: 16 for completions; for chat (None) all the context left after the prompt."""
        return None if self.chat else 16

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    @property
    def id_prefix(self) -> str:
        return "chatcmpl" if self.chat else "cmpl"

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
        """One choice of a whole answer."""
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def chunk_choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None = None,
                     first: bool = False) -> dict:
        """One choice of a streamed chunk (chat's first one opens the assistant's turn)."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


COMPLETION, CHAT = Endpoint(chat=False), Endpoint(chat=True)


def _lp(value: float) -> float:
    return max(value, MIN_LOGPROB)


def completion_logprobs(ids: Sequence[int], entries: Sequence[TokenLogprob | None], k: int,
                        token_text: Callable[[int], str], text_offset: int = 0) -> dict:
    """Completions' legacy logprobs of `ids`: each token's logprob and a map of the token and the top k to theirs
    (so k or k + 1 entries, as OpenAI); a None entry (the first prompt token) has neither."""
    tokens = [token_text(t) for t in ids]
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets = []
    for token, entry in zip(tokens, entries, strict=True):
        offsets.append(text_offset)
        text_offset += len(token)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_lp(entry.logprob))
        top = {token: _lp(entry.logprob)}
        for alt, logprob in entry.top[:k]:
            top.setdefault(token_text(alt), _lp(logprob))
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _chat_token(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8", errors="replace"))}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int], str]) -> dict:
    """Chat's logprobs: one `content` item per token, with its `top_logprobs` (the top_logprobs most likely, as
    OpenAI: unlike vLLM's, the chosen token is not put first)."""
    return {"content": [{**_chat_token(token_text(e.token_id), e.logprob),
                         "top_logprobs": [_chat_token(token_text(t), lp) for t, lp in e.top]} for e in entries]}


def vllm_prompt_logprobs(entries: Sequence[TokenLogprob | None], token_text: Callable[[int], str]) -> list:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}} for
    the token and the top alternatives (`rank` counts from 1; the prompt token's is null unless it is among them)."""
    out: list[dict | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        ranks = {t: rank for rank, (t, _) in enumerate(entry.top, start=1)}
        scores = {str(entry.token_id): {"logprob": _lp(entry.logprob), "rank": ranks.get(entry.token_id),
                                        "decoded_token": token_text(entry.token_id)}}
        for t, logprob in entry.top:
            scores.setdefault(str(t), {"logprob": _lp(logprob), "rank": ranks[t], "decoded_token": token_text(t)})
        out.append(scores)
    return out


def sse(obj: Any) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"  # the last event of a stream


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The `usage` object of an answer."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
