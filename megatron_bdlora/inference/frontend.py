"""Between HTTP and a ServingLoop (rank 0): a validated request turned into an engine submission, its events
collected into one answer or streamed as server-sent events, adapters loaded and unloaded.

The event loop never waits on the engine or on a tokenizer: tokenising, chat templating, submits, adapter loads and
event-queue reads run in worker threads. Generation requests in flight are bounded (ServerPolicy), so overload is a
429, never an unbounded queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Mapping

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from megatron_bdlora.inference.errors import APIError, error_body
from megatron_bdlora.inference.policy import MIN_TEMPERATURE, ServerPolicy, files_under_roots, under_roots
from megatron_bdlora.inference.protocol import (
    SSE_DONE,
    UNSUPPORTED_UNLESS,
    ChatMessage,
    Endpoint,
    SamplingRequest,
    sse,
    usage,
)
from megatron_bdlora.inference.requests import AdapterConflictError, GenerationParams, ParamError, TokenEvent

if TYPE_CHECKING:
    from megatron_bdlora.inference.serving_loop import ServingLoop

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a waiting request checks that the engine is alive and the client still connected
MAX_WAITING_THREADS = 512  # worker threads that may block on event queues at once (one per waiting request)
MAX_TOKENIZING_THREADS = 4  # prompts tokenised at once (the tokenizer releases the GIL; this bounds the CPU it takes)
RETRY_AFTER_S = 1  # what a 429 asks the client to wait
OUTSIDE_ROOTS = "'lora_path' is not a directory under the server's --lora-root directories"  # whatever the reason


@dataclass
class _Job:
    """One submitted request: its engine id, event queue, and whether its last event has arrived."""

    request_id: int
    events: queue.Queue
    prompt_tokens: int
    done: bool = False
    aborted: bool = False
    checked_at: float = field(default_factory=time.monotonic)  # when the client's connection was last checked
    admission: "_Admission | None" = None  # released once the answer is complete or the stream ends


class _Admission:
    """One generation request counted against ServerPolicy.max_queued_requests; released exactly once (from the
    event loop, or from the worker thread of a stream's background task)."""

    def __init__(self, front: "OpenAIFrontEnd") -> None:
        self.front, self.released = front, False

    def release(self) -> None:
        with self.front.count_lock:
            if not self.released:
                self.released = True
                self.front.in_flight -= 1


class _ClientGone(Exception):
    """The client disconnected while its request was waiting."""


def _bad_param(err: ParamError, endpoint: Endpoint) -> APIError:
    """The 400 for an out-of-range setting, naming its field (the prompt's is the endpoint's prompt field)."""
    return APIError(400, str(err), endpoint.prompt_field if err.param == "prompt" else err.param)


class OpenAIFrontEnd:
    """Request handling between HTTP and a ServingLoop: validation, submission, event streaming, adapters."""

    def __init__(self, loop: "ServingLoop", served_model_name: str | None, base_root: str | None,
                 adapter_paths: Mapping[str, str] | None, policy: ServerPolicy | None = None):
        self.loop = loop
        self.tokenizer = loop.tokenizer
        self.base_name = served_model_name or loop.base_name
        self.base_root = base_root or self.base_name
        self.adapter_paths = dict(adapter_paths or {})
        self.policy = policy or ServerPolicy()
        self.created = int(time.time())
        self.in_flight = 0  # generation requests admitted and not yet answered
        self.count_lock = threading.Lock()
        self.rejected: Counter = Counter()  # refusals by reason, for /metrics
        self._limiters: dict[str, anyio.CapacityLimiter] = {}

    def _limiter(self, kind: str, size: int) -> anyio.CapacityLimiter:
        """Worker threads of one kind, apart from the default pool (adapter loads use that one); made on first use,
        inside the event loop."""
        if kind not in self._limiters:
            self._limiters[kind] = anyio.CapacityLimiter(size)
        return self._limiters[kind]

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """Worker threads for engine calls and queue reads."""
        return self._limiter("engine", MAX_WAITING_THREADS)

    def reject(self, reason: str) -> None:
        """Count a refused request by reason (unauthorized, body_too_large, queue_full, invalid, not_found, ...)."""
        self.rejected[reason] += 1

    def admit(self) -> _Admission:
        """Count a generation request in flight, or refuse it with a 429 when the bound is reached."""
        limit = self.policy.max_queued_requests
        if self.in_flight >= limit:
            raise APIError(429, f"the server is at its limit of {limit} requests in flight (--max-queued-requests); "
                                f"retry after {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)})
        with self.count_lock:
            self.in_flight += 1
        return _Admission(self)

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
                        raise APIError(400, f"messages[{i}].content: only text parts are supported, got a part of type "
                                            f"{part.type!r}", "messages")
                content = "\n".join(part.text for part in content)
            plain.append({**(message.model_extra or {}), "role": message.role, "content": content or ""})
        try:
            ids = self.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
        except Exception as err:  # the template is the judge of a conversation's shape; any failure is the input's
            raise APIError(400, f"messages do not fit the model's chat template: {err}", "messages") from None
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        return list(ids)

    async def prompt_ids(self, body: SamplingRequest, endpoint: Endpoint) -> list[int]:
        """The request's prompt as token ids, tokenised (or chat-templated) in a worker thread: a long prompt never
        stalls other streams or /health."""
        if endpoint.chat:
            return await anyio.to_thread.run_sync(self.chat_prompt, body.messages, limiter=self._tokenizing)
        return await anyio.to_thread.run_sync(self.completion_prompt, body.prompt, limiter=self._tokenizing)

    @property
    def _tokenizing(self) -> anyio.CapacityLimiter:
        return self._limiter("tokenize", MAX_TOKENIZING_THREADS)

    # ---- parameters -------------------------------------------------------------------------------------------

    def params(self, body: SamplingRequest, endpoint: Endpoint, prompt_tokens: int,
               max_tokens: int | None) -> GenerationParams:
        """Checked decoding settings; without max_tokens, the endpoint's default."""
        for name, off in UNSUPPORTED_UNLESS.items():
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
                                f"{prompt_tokens} tokens (at least 1 token must be left to generate)",
                           endpoint.prompt_field)
        if max_tokens is None:
            default = endpoint.default_max_tokens
            max_tokens = default if default is not None else limit - prompt_tokens
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        self._check_stops(stop, tuple(body.stop_token_ids or ()))
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=self._temperature(body.temperature),
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            seed=body.seed,
            stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=bool(body.ignore_eos),
        )
        try:
            params.check(prompt_tokens, limit)
        except ParamError as err:
            raise _bad_param(err, endpoint) from None
        return params

    def _check_stops(self, stop: tuple[str, ...], stop_token_ids: tuple[int, ...]) -> None:
        """Stop strings and ids within the policy's caps (each stop string is held back from a stream and searched
        for at every step, so their number and length bound per-token work)."""
        policy = self.policy
        if "" in stop:
            raise APIError(400, "'stop' strings must not be empty", "stop")
        if len(stop) > policy.max_stop_sequences:
            raise APIError(400, f"'stop' has {len(stop)} strings; at most {policy.max_stop_sequences} are allowed "
                                "(--max-stop-sequences)", "stop")
        longest = max((len(s) for s in stop), default=0)
        if longest > policy.max_stop_length:
            raise APIError(400, f"a 'stop' string has {longest} characters; at most {policy.max_stop_length} are "
                                "allowed (--max-stop-length)", "stop")
        if len(stop_token_ids) > policy.max_stop_token_ids:
            raise APIError(400, f"'stop_token_ids' has {len(stop_token_ids)} ids; at most {policy.max_stop_token_ids} "
                                "are allowed (--max-stop-token-ids)", "stop_token_ids")
        self._check_token_ids(list(stop_token_ids), "stop_token_ids")

    @staticmethod
    def _temperature(value: float | None) -> float:
        """vLLM's rule: 0 < t < MIN_TEMPERATURE is raised to it (logits / t would overflow); range checks follow."""
        if value is None:
            return 1.0
        if 0.0 < value < MIN_TEMPERATURE:
            log.warning("temperature %s is below %s (logits / t overflows); using %s", value, MIN_TEMPERATURE,
                        MIN_TEMPERATURE)
            return MIN_TEMPERATURE
        return value

    # ---- generation -------------------------------------------------------------------------------------------

    async def serve(self, request: Request, endpoint: Endpoint, body: SamplingRequest,
                    max_tokens: int | None) -> Response:
        """A completions or chat request from its parsed body to its answer, counted in flight from admission until
        its answer is complete (or its stream ends)."""
        admission = self.admit()
        try:
            adapter, model = self.adapter_for(body.model)
            prompt_ids = await self.prompt_ids(body, endpoint)
            params = self.params(body, endpoint, len(prompt_ids), max_tokens)
            return await self.generate(request, endpoint, model, adapter, prompt_ids, params, body, admission)
        except BaseException:
            admission.release()
            raise

    async def generate(self, request: Request, endpoint: Endpoint, model: str, adapter: str | None,
                       prompt_ids: list[int], params: GenerationParams, body: SamplingRequest,
                       admission: _Admission) -> Response:
        """Submit one request and answer with the whole text, or stream it as server-sent events."""
        try:
            request_id, events = await anyio.to_thread.run_sync(self.loop.submit, prompt_ids, adapter, params,
                                                                limiter=self.limiter)
        except KeyError:
            raise APIError(404, f"The model `{model}` does not exist.", "model") from None
        except ParamError as err:
            raise _bad_param(err, endpoint) from None
        except ValueError as err:
            raise APIError(400, str(err)) from None
        except RuntimeError as err:  # shutting down, or the engine died
            raise APIError(503, f"the serving engine is not accepting requests: {err}") from None
        job = _Job(request_id, events, len(prompt_ids), admission=admission)
        meta = {"id": f"{endpoint.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(job, endpoint, meta, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(self._abort, job))
        return await self._complete(request, job, endpoint, meta)

    def _abort(self, job: _Job) -> None:
        """Cancel a request the client no longer waits for (at most once, and only if it is still running); its
        answer is over either way, so its place in flight is released."""
        if job.admission is not None:
            job.admission.release()
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
                    event = await anyio.to_thread.run_sync(job.events.get, True, POLL_S, abandon_on_cancel=True,
                                                           limiter=self.limiter)
                except queue.Empty:
                    if not self.loop.healthy():
                        raise APIError(503, "the serving engine stopped before this request finished") from None
                    continue
            job.done = event.finished
            return event

    async def _complete(self, request: Request, job: _Job, endpoint: Endpoint, meta: dict) -> Response:
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
        return JSONResponse({**meta, "object": endpoint.object,
                             "choices": [endpoint.choice("".join(texts), event.finish_reason)],
                             "usage": usage(job.prompt_tokens, event.completion_tokens)})

    async def _stream(self, job: _Job, endpoint: Endpoint, meta: dict, include_usage: bool) -> AsyncIterator[str]:
        extra = {"usage": None} if include_usage else {}
        head = {**meta, "object": endpoint.chunk_object}
        try:
            if endpoint.chat:
                yield sse({**head, "choices": [endpoint.chunk_choice("", None, first=True)], **extra})
            while True:
                try:
                    event = await self._next_event(job)
                except APIError as err:  # the engine stopped: the status line is long gone, so say it in the stream
                    yield sse(error_body(err.status, err.message))
                    break
                if event.finish_reason == "error":
                    yield sse(error_body(500, f"generation failed: {event.error}"))
                    break
                if event.text or event.finished:
                    yield sse({**head, "choices": [endpoint.chunk_choice(event.text, event.finish_reason)], **extra})
                if event.finished:
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": usage(job.prompt_tokens, event.completion_tokens)})
                    break
            yield SSE_DONE
        finally:
            self._abort(job)

    # ---- adapters and models ----------------------------------------------------------------------------------

    def model_card(self, name: str) -> dict:
        """An OpenAI model object, with vLLM's `root` (base directory / adapter path) and `parent` (adapters: the
        base)."""
        adapter = name != self.base_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "megatron-bdlora",
                "root": self.adapter_paths.get(name, name) if adapter else self.base_root,
                "parent": self.base_name if adapter else None, "max_model_len": self.loop.max_model_len,
                "permission": []}

    def models(self) -> dict:
        """The /v1/models list: the base model first, then the adapters."""
        return {"object": "list", "data": [self.model_card(n) for n in [self.base_name, *self.loop.adapter_names()]]}

    def check_runtime_updating(self) -> None:
        """vLLM serves the load/unload routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING; here a flag turns them on."""
        if not self.policy.enable_lora_runtime_updating:
            raise APIError(404, "loading and unloading LoRA adapters at runtime is disabled on this server (start it "
                                "with --enable-lora-runtime-updating)")

    def _allowed_path(self, path: str) -> str:
        """The adapter directory resolved (symlinks, `..`), if it lies under a --lora-root; one 400 otherwise."""
        roots = self.policy.lora_roots
        resolved = under_roots(path, roots)
        if resolved is None or not files_under_roots(resolved, roots):
            raise APIError(400, OUTSIDE_ROOTS, "lora_path")
        return str(resolved)

    async def load_adapter(self, name: str, path: str) -> PlainTextResponse:
        """Register an adapter on every rank (blocking, so in a worker thread); vLLM's plain-text answer.

        The name is checked here, the one place (the loop relies on it); the files are the loop's to read, from the
        resolved directory (so a symlink swapped after the check is not followed)."""
        self.check_runtime_updating()
        if not name.strip():
            raise APIError(400, "'lora_name' must not be empty", "lora_name")
        if not path.strip():
            raise APIError(400, "'lora_path' must not be empty", "lora_path")
        if name in (self.base_name, self.loop.base_name):
            raise APIError(400, f"'lora_name' {name!r} is the base model's name", "lora_name")
        if name in self.loop.adapter_names():
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        resolved = await run_in_threadpool(self._allowed_path, path)
        try:
            await run_in_threadpool(self.loop.load_adapter, name, resolved)
        except AdapterConflictError as err:
            raise APIError(409, str(err), "lora_name") from None
        except Exception as err:  # reading the adapter failed: the path is at fault, unless the engine died
            if not self.loop.healthy():
                raise APIError(503, f"the serving engine stopped: {err}") from None
            detail = str(err) if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {err}"
            raise APIError(400, f"cannot load LoRA adapter '{name}' from {path}: {detail}", "lora_path") from None
        self.adapter_paths[name] = resolved
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, name: str) -> PlainTextResponse:
        """Forget an adapter once its requests are done (blocking, so in a worker thread); vLLM's plain-text answer."""
        self.check_runtime_updating()
        try:
            await run_in_threadpool(self.loop.unload_adapter, name)
        except AdapterConflictError as err:
            raise APIError(409, str(err), "lora_name") from None
        except KeyError:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name") from None
        except RuntimeError as err:
            if self.loop.healthy():
                raise
            raise APIError(503, f"the serving engine stopped: {err}") from None
        self.adapter_paths.pop(name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
