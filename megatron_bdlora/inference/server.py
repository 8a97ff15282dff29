"""OpenAI-compatible HTTP front end of a ServingLoop (rank 0), with vLLM's routes, request bodies and answers.

  POST /v1/completions          prompt: a string or a list of token ids (one prompt per request)
  POST /v1/chat/completions     messages, formatted with the tokenizer's chat template
                                both: `stream: true` for server-sent events ending in `data: [DONE]`
  GET  /v1/models[/{id}]        the base model and the adapters (`parent` = base, `root` = adapter path)
  POST /v1/load_lora_adapter    {"lora_name", "lora_path"};  POST /v1/unload_lora_adapter {"lora_name"}
  GET  /health                  200 while the engine runs;   GET /metrics  Prometheus text format

Bad input is answered before it reaches the engine, as OpenAI's error JSON
`{"error": {"message", "type", "param", "code"}}` with status 400 (404 for an unknown model or adapter). The event
loop never waits on the engine: submits, adapter loads and event-queue reads run in worker threads.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from megatron_bdlora.inference.requests import GenerationParams, TokenEvent

if TYPE_CHECKING:
    from megatron_bdlora.inference.engine import ServingLoop

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a waiting request checks that the engine is alive and the client still connected
MAX_WAITING_THREADS = 512  # worker threads that may block on event queues at once (one per waiting request)
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
                413: "RequestTooLargeError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
# Request fields of OpenAI / vLLM this server does not implement, with the values that mean "off": any other value
# is a 400 naming the field, rather than an answer that silently ignores it.
_UNSUPPORTED_UNLESS = {
    "echo": (None, False), "logprobs": (None, False), "top_logprobs": (None, 0), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "logit_bias": (None, {}), "min_tokens": (None, 0), "min_p": (None, 0),
    "tools": (None, []), "response_format": (None, {"type": "text"}), "use_beam_search": (None, False),
}
_PARAM_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "seed"}  # GenerationParams.check names these first


# ---------------------------------------------------------------------------------------------------------------
# request bodies


class _Body(BaseModel):
    """Strict JSON types (a string is not a number, a bool not an int); unknown fields are kept to be checked."""

    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool | None = None


class _SamplingBody(_Body):
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


class CompletionRequest(_SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are given


class LoadLoRARequest(_Body):
    lora_name: str
    lora_path: str


class UnloadLoRARequest(_Body):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's optional id; accepted and ignored


# ---------------------------------------------------------------------------------------------------------------
# errors


class APIError(Exception):
    """An answer in OpenAI's error shape: HTTP status, message and the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI / vLLM error JSON: {"error": {"message", "type", "param", "code"}} (also sent as an SSE event)."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "APIError"), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An error answer with its HTTP status."""
    return JSONResponse(error_body(status, message, param), status_code=status)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable message and the top-level field at fault for FastAPI's request validation errors."""
    first = errors[0]
    loc = [str(part) for part in first["loc"] if part != "body"]
    if first["type"] == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])} (at position {loc[0] if loc else '?'})", None
    if not loc:
        if first["type"] == "missing":
            return "the request body is missing: send a JSON object with Content-Type: application/json", None
        return "the request body must be a JSON object (with Content-Type: application/json)", None
    param = loc[0]
    if first["type"] == "missing":
        return f"'{'.'.join(loc)}' is a required field", param
    got = repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if sum(1 for e in errors if len(e["loc"]) > 1 and str(e["loc"][1]) == param) > 1:  # a union: every member failed
        kinds = sorted({str(e["loc"][2]) for e in errors if len(e["loc"]) > 2 and str(e["loc"][1]) == param})
        expected = f" (expected {' or '.join(kinds)})" if kinds else ""
        return f"'{param}' has the wrong type{expected}: got {got}", param
    return f"'{'.'.join(loc)}': {first['msg']}, got {got}", param


def _param_named_in(message: str, default: str | None) -> str | None:
    """The request field a GenerationParams.check / engine message is about (it starts with or names it)."""
    words = re.findall(r"[a-z_]+", message)
    if words and words[0] in _PARAM_FIELDS:
        return words[0]
    return "max_tokens" if "max_tokens" in words else default


# ---------------------------------------------------------------------------------------------------------------
# response shapes


@dataclass(frozen=True)
class _Shape:
    """How one endpoint wraps generated text: completions (`text`) or chat (`message` / `delta`)."""

    chat: bool

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
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


COMPLETION, CHAT = _Shape(chat=False), _Shape(chat=True)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class _Job:
    """One submitted request: its engine id, event queue, and whether its last event has arrived."""

    request_id: int
    events: queue.Queue
    prompt_tokens: int
    done: bool = False
    aborted: bool = False
    checked_at: float = field(default_factory=time.monotonic)  # when the client's connection was last checked


class _ClientGone(Exception):
    """The client disconnected while its request was waiting."""


# ---------------------------------------------------------------------------------------------------------------
# metrics

_METRIC_HELP = {
    "running": "Requests being decoded by the engine",
    "waiting": "Requests queued for the engine",
    "generated_tokens_total": "Completion tokens generated",
    "prompt_tokens_total": "Prompt tokens processed",
    "requests_finished_total": "Requests finished (any finish reason)",
    "adapter_loads_total": "Adapter loads into device slots",
    "adapter_evictions_total": "Adapters evicted from device slots",
    "paused": "Requests paused by the engine (KV cache full)",
    "adapters_resident": "Adapters in device slots",
    "engine_evictions_total": "Requests evicted from the KV cache",
    "engine_steps_total": "Engine steps",
}


class _LoopCollector(Collector):
    """Prometheus view of loop.metrics() read at scrape time: `*_total` keys are counters, the rest gauges."""

    def __init__(self, loop: "ServingLoop"):
        self.loop = loop

    def collect(self):
        for key, value in sorted(self.loop.metrics().items()):
            name = "bdlora_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            doc = _METRIC_HELP.get(key, f"serving loop metric {key}")
            if key.endswith("_total"):
                yield CounterMetricFamily(name.removesuffix("_total"), doc, value=float(value))
            else:
                yield GaugeMetricFamily(name, doc, value=float(value))


# ---------------------------------------------------------------------------------------------------------------
# the front end


class OpenAIFrontEnd:
    """Request handling between HTTP and a ServingLoop: validation, submission, event streaming, adapters."""

    def __init__(self, loop: "ServingLoop", served_model_name: str | None, base_root: str | None,
                 adapter_paths: Mapping[str, str] | None):
        self.loop = loop
        self.tokenizer = loop.tokenizer
        self.base_name = served_model_name or loop.base_name
        self.base_root = base_root or self.base_name
        self.adapter_paths = dict(adapter_paths or {})
        self.created = int(time.time())
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """Worker threads for engine calls and queue reads, apart from the default pool (loads use that one)."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(MAX_WAITING_THREADS)
        return self._limiter

    # ---- model and prompt -------------------------------------------------------------------------------------

    def adapter_for(self, model: str | None) -> tuple[str | None, str]:
        """(adapter name or None for the base model, the model id to answer with); 404 for an unknown model."""
        if model is None or model == self.base_name or model == self.loop.base_name:
            return None, self.base_name
        if model in self.loop.adapter_names():
            return model, model
        raise APIError(404, f"The model `{model}` does not exist.", "model")

    def _check_token_ids(self, ids: list[int], field_name: str) -> None:
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{field_name} must be token ids in [0, {vocab}), got {bad[:5]}", field_name)

    def completion_prompt(self, prompt: str | list) -> list[int]:
        """Token ids of a completions prompt: a string, token ids, or a one-element list of either."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request: got a list of {len(prompt)} prompts; send each prompt "
                                    "in its own request (a string or a list of token ids)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        self._check_token_ids(prompt, "prompt")
        return list(prompt)

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        """Token ids of a conversation with the assistant's turn opened (the tokenizer's chat template)."""
        if not messages:
            raise APIError(400, "'messages' must hold at least one message", "messages")
        plain = []
        for i, message in enumerate(messages):
            content = message.content
            if isinstance(content, list):
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"messages[{i}].content: only text parts are supported, got a part of type {part.type!r}", "messages")
                content = "\n".join(part.text for part in content)
            plain.append({**(message.model_extra or {}), "role": message.role, "content": content or ""})
        try:
            ids = self.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as err:  # noqa: BLE001 - the template is the judge of a conversation's shape; any failure is the input's
            raise APIError(400, f"messages do not fit the model's chat template: {err}", "messages") from None
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        return list(ids)

    # ---- parameters -------------------------------------------------------------------------------------------

    def params(self, body: _SamplingBody, prompt_tokens: int, max_tokens: int | None, default_max_tokens: int | None,
               prompt_field: str) -> GenerationParams:
        """Checked decoding settings; default_max_tokens None means all the context left after the prompt."""
        for name, off in _UNSUPPORTED_UNLESS.items():
            value = (body.model_extra or {}).get(name)
            if value not in off:
                raise APIError(400, f"'{name}' is not supported by this server (got {value!r})", name)
        if body.n not in (None, 1):
            raise APIError(400, f"'n' must be 1 (one choice per request), got {body.n}", "n")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
        limit = self.loop.max_model_len
        if prompt_tokens >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt has "
                                f"{prompt_tokens} tokens (at least 1 token must be left to generate)", prompt_field)
        if max_tokens is None:
            max_tokens = default_max_tokens if default_max_tokens is not None else limit - prompt_tokens
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if "" in stop:
            raise APIError(400, "'stop' strings must not be empty", "stop")
        self._check_token_ids(list(body.stop_token_ids or ()), "stop_token_ids")
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            seed=body.seed,
            stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=bool(body.ignore_eos),
        )
        try:
            params.check(prompt_tokens, limit)
        except ValueError as err:
            raise APIError(400, str(err), _param_named_in(str(err), prompt_field)) from None
        return params

    # ---- generation -------------------------------------------------------------------------------------------

    async def generate(self, request: Request, shape: _Shape, model: str, adapter: str | None, prompt_ids: list[int],
                       params: GenerationParams, body: _SamplingBody) -> Response:
        """Submit one request and answer with the whole text, or stream it as server-sent events."""
        try:
            request_id, events = await anyio.to_thread.run_sync(self.loop.submit, prompt_ids, adapter, params, limiter=self.limiter)
        except KeyError:
            raise APIError(404, f"The model `{model}` does not exist.", "model") from None
        except ValueError as err:
            raise APIError(400, str(err), _param_named_in(str(err), None)) from None
        except RuntimeError as err:  # shutting down, or the engine died
            raise APIError(503, f"the serving engine is not accepting requests: {err}") from None
        job = _Job(request_id, events, len(prompt_ids))
        meta = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(job, shape, meta, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(self._abort, job))
        return await self._complete(request, job, shape, meta)

    def _abort(self, job: _Job) -> None:
        """Cancel a request the client no longer waits for (at most once, and only if it is still running)."""
        if not job.done and not job.aborted:
            job.aborted = True
            self.loop.cancel(job.request_id)

    async def _next_event(self, job: _Job, request: Request | None = None) -> TokenEvent:
        """The job's next event, waited for in a worker thread; 503 if the engine stops meanwhile.

        With `request` (answers that are not streamed, whose disconnects Starlette does not report), _ClientGone
        once the client has left, checked every POLL_S.
        """
        while True:
            if request is not None and time.monotonic() - job.checked_at >= POLL_S:
                job.checked_at = time.monotonic()
                if await request.is_disconnected():
                    raise _ClientGone()
            try:
                event = job.events.get_nowait()
            except queue.Empty:
                try:
                    event = await anyio.to_thread.run_sync(job.events.get, True, POLL_S, abandon_on_cancel=True, limiter=self.limiter)
                except queue.Empty:
                    if not self.loop.healthy():
                        raise APIError(503, "the serving engine stopped before this request finished") from None
                    continue
            job.done = event.finished
            return event

    async def _complete(self, request: Request, job: _Job, shape: _Shape, meta: dict) -> Response:
        texts: list[str] = []
        try:
            while True:
                event = await self._next_event(job, request)
                texts.append(event.text)
                if event.finished:
                    break
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; the request is cancelled below
        finally:
            self._abort(job)
        if event.finish_reason == "error":
            raise APIError(500, f"generation failed: {event.error}")
        return JSONResponse({**meta, "object": shape.object, "choices": [shape.choice("".join(texts), event.finish_reason)],
                             "usage": _usage(job.prompt_tokens, event.completion_tokens)})

    async def _stream(self, job: _Job, shape: _Shape, meta: dict, include_usage: bool) -> AsyncIterator[str]:
        extra = {"usage": None} if include_usage else {}
        head = {**meta, "object": shape.chunk_object}
        try:
            if shape.chat:
                yield _sse({**head, "choices": [shape.chunk_choice("", None, first=True)], **extra})
            while True:
                try:
                    event = await self._next_event(job)
                except APIError as err:  # the engine stopped: the status line is long gone, so say it in the stream
                    yield _sse(error_body(err.status, err.message))
                    break
                if event.finish_reason == "error":
                    yield _sse(error_body(500, f"generation failed: {event.error}"))
                    break
                if event.text or event.finished:
                    yield _sse({**head, "choices": [shape.chunk_choice(event.text, event.finish_reason)], **extra})
                if event.finished:
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(job.prompt_tokens, event.completion_tokens)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            self._abort(job)

    # ---- adapters and models ----------------------------------------------------------------------------------

    def model_card(self, name: str) -> dict:
        """An OpenAI model object, with vLLM's `root` (base directory / adapter path) and `parent` (adapters: the base)."""
        adapter = name != self.base_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "megatron-bdlora",
                "root": self.adapter_paths.get(name, name) if adapter else self.base_root,
                "parent": self.base_name if adapter else None, "max_model_len": self.loop.max_model_len,
                "permission": []}

    def models(self) -> dict:
        """The /v1/models list: the base model first, then the adapters."""
        return {"object": "list", "data": [self.model_card(n) for n in [self.base_name, *self.loop.adapter_names()]]}

    async def load_adapter(self, name: str, path: str) -> PlainTextResponse:
        """Register an adapter on every rank (blocking, so in a worker thread); vLLM's plain-text answer."""
        if not name.strip():
            raise APIError(400, "'lora_name' must not be empty", "lora_name")
        if not path.strip():
            raise APIError(400, "'lora_path' must not be empty", "lora_path")
        if name in (self.base_name, self.loop.base_name):
            raise APIError(400, f"'lora_name' {name!r} is the base model's name", "lora_name")
        if name in self.loop.adapter_names():
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        try:
            await run_in_threadpool(self.loop.load_adapter, name, path)
        except Exception as err:  # noqa: BLE001 - reading the adapter failed: the path is at fault, unless the engine died
            if not self.loop.healthy():
                raise APIError(503, f"the serving engine stopped: {err}") from None
            detail = str(err) if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {err}"
            raise APIError(400, f"cannot load LoRA adapter '{name}' from {path}: {detail}", "lora_path") from None
        self.adapter_paths[name] = path
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, name: str) -> PlainTextResponse:
        """Forget an adapter once its requests are done (blocking, so in a worker thread); vLLM's plain-text answer."""
        try:
            await run_in_threadpool(self.loop.unload_adapter, name)
        except KeyError:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name") from None
        except RuntimeError as err:
            if self.loop.healthy():
                raise
            raise APIError(503, f"the serving engine stopped: {err}") from None
        self.adapter_paths.pop(name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def build_app(loop: "ServingLoop", *, served_model_name: str | None = None, base_root: str | None = None,
              adapter_paths: Mapping[str, str] | None = None) -> FastAPI:
    """The OpenAI-compatible app over a started ServingLoop; names/paths default to the loop's own."""
    front = OpenAIFrontEnd(loop, served_model_name, base_root, adapter_paths)
    app = FastAPI(title="megatron-bdlora", description=__doc__.split("\n")[0])
    app.state.front = front
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_LoopCollector(loop))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err.status, err.message, err.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(400, *_validation_message(list(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(err).__name__}: {err}")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        adapter, model = front.adapter_for(body.model)
        prompt_ids = front.completion_prompt(body.prompt)
        params = front.params(body, len(prompt_ids), body.max_tokens, 16, "prompt")
        return await front.generate(request, COMPLETION, model, adapter, prompt_ids, params, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        adapter, model = front.adapter_for(body.model)
        prompt_ids = front.chat_prompt(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = front.params(body, len(prompt_ids), max_tokens, None, "messages")
        return await front.generate(request, CHAT, model, adapter, prompt_ids, params, body)

    @app.get("/v1/models")
    async def models() -> dict:
        return front.models()

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        front.adapter_for(model)
        return front.model_card(model if model in front.loop.adapter_names() else front.base_name)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRARequest) -> PlainTextResponse:
        return await front.load_adapter(body.lora_name, body.lora_path)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRARequest) -> PlainTextResponse:
        return await front.unload_adapter(body.lora_name)

    @app.get("/health")
    async def health() -> Response:
        if not loop.healthy():
            return error_response(503, "the serving engine is not running")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
