"""The OpenAI / vLLM request protocol: request bodies (pydantic, strictly typed) and the answers' JSON shapes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

# Request fields of OpenAI / vLLM this server does not implement, with the values that mean "off": any other value
# is a 400 naming the field, rather than an answer that silently ignores it.
UNSUPPORTED_UNLESS = {
    "echo": (None, False), "logprobs": (None, False), "top_logprobs": (None, 0), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "logit_bias": (None, {}), "min_tokens": (None, 0), "min_p": (None, 0),
    "tools": (None, []), "response_format": (None, {"type": "text"}), "use_beam_search": (None, False),
}


# ---------------------------------------------------------------------------------------------------------------
# request bodies


class _Body(BaseModel):
    """Strict JSON types (a string is not a number, a bool not an int); unknown fields are kept to be checked."""

    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool | None = None


class SamplingRequest(_Body):
    """What completions and chat share: the model, decoding settings and streaming."""

    model: str | None = None  # None: the base model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension (extra_body in the openai client)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool | None = None  # vLLM extension
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI does for serving


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are given


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

    def choice(self, text: str, finish_reason: str | None) -> dict:
        """The one choice of a whole answer."""
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: str | None, first: bool = False) -> dict:
        """The one choice of a streamed chunk (chat's first one opens the assistant's turn)."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


COMPLETION, CHAT = Endpoint(chat=False), Endpoint(chat=True)


def sse(obj: Any) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"  # the last event of a stream


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The `usage` object of an answer."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
