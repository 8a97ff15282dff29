"""Between HTTP and a ServingLoop (rank 0): a validated request turned into engine submissions, their events
collected into one answer or streamed as server-sent events, adapters loaded and unloaded, prompts tokenised.

One HTTP request becomes one engine request per choice: each prompt of a completions request (a list of strings or
of token-id lists) times `n`, submitted together; with a seed, choice j of a prompt uses seed + j (vLLM V1's
parallel sampling rule), so each choice is reproducible on its own whatever else is in the batch. Choice indices
are prompt_index * n + j, as vLLM's. If one of them fails, or the client goes, every other one is cancelled.

The event loop never waits on the engine or on a tokenizer: tokenising, chat templating, submits, adapter loads and
event-queue reads run in worker threads. Engine requests in flight are bounded (ServerPolicy), so overload is a
429, never an unbounded queue.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import queue
import threading
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, AsyncIterator, Callable, Mapping

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from megatron_bdlora.inference.errors import APIError, error_body
from megatron_bdlora.inference.policy import MIN_TEMPERATURE, ServerPolicy, files_under_roots, under_roots
from megatron_bdlora.inference.protocol import (
    SSE_DONE,
    UNSUPPORTED_UNLESS,
    ChatMessage,
    DetokenizeRequest,
    Endpoint,
    SamplingRequest,
    TokenizeRequest,
    chat_logprobs,
    completion_logprobs,
    sse,
    usage,
    vllm_prompt_logprobs,
)
from megatron_bdlora.inference.requests import (
    AdapterConflictError,
    GenerationParams,
    ParamError,
    TokenEvent,
    TokenLogprob,
)

if TYPE_CHECKING:
    from pydantic import BaseModel

    from megatron_bdlora.inference.serving_loop import ServingLoop

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a waiting request checks that the engine is alive and the client still connected
MAX_WAITING_THREADS = 512  # worker threads that may block on event queues at once (one per engine request waited on)
MAX_TOKENIZING_THREADS = 4  # prompts tokenised at once (the tokenizer releases the GIL; this bounds the CPU it takes)
RETRY_AFTER_S = 1  # what a 429 asks the client to wait
OUTSIDE_ROOTS = "'lora_path' is not a directory under the server's --lora-root directories"  # whatever the reason
# request fields passed to GenerationParams unchanged when given (the others are converted or checked first)
_PASSED_THROUGH = ("top_p", "top_k", "min_p", "seed", "ignore_eos", "min_tokens", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "include_stop_str_in_output", "skip_special_tokens")


@dataclass
class _Prompt:
    """One prompt of a request: its token ids and, for echo, the text it was sent as (None: token ids)."""

    ids: list[int]
    text: str | None = None


@dataclass
class _Job:
    """One engine request, i.e. one choice of the answer: its engine id and event queue, and what it has produced."""

    index: int  # the choice's index: prompt index * n + j
    prompt: _Prompt
    params: GenerationParams
    request_id: int = -1
    events: queue.Queue | None = None
    done: bool = False
    aborted: bool = False
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    streamed_chars: int = 0  # text sent so far in a stream (completions' text_offset)
    echoed: bool = False  # a stream has sent the prompt (echo)

    def record(self, event: TokenEvent) -> None:
        self.texts.append(event.text)
        self.token_ids.extend(event.token_ids)
        self.logprobs.extend(event.logprobs)
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        self.finish_reason = event.finish_reason
        self.completion_tokens = event.completion_tokens


@dataclass(frozen=True)
class _Reply:
    """How a request is answered: its endpoint and ids, and what the answer carries besides the text."""

    endpoint: Endpoint
    meta: dict  # id, created, model
    echo: bool = False  # completions: the prompt before the completion
    top: int | None = None  # log-probabilities with this many top alternatives (None: none)
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs extension asked for
    include_usage: bool = False  # a stream ends with a usage chunk
    continuous_usage: bool = False  # ... and every chunk carries the usage so far


class _Admission:
    """Engine requests counted against ServerPolicy.max_queued_requests; released exactly once (from the event loop
    or from a worker thread)."""

    def __init__(self, front: "OpenAIFrontEnd", count: int) -> None:
        self.front, self.count, self.released = front, count, False

    def release(self) -> None:
        with self.front.count_lock:
            if not self.released:
                self.released = True
                self.front.in_flight -= self.count


class _ClientGone(Exception):
    """The client disconnected while its request was waiting."""


class _FanInStream(StreamingResponse):
    """Server-sent events of several engine requests: their forwarding tasks run around the whole response, started
    and stopped by the task that sends it (never inside the body's generator, which may be abandoned mid-way)."""

    def __init__(self, front: "OpenAIFrontEnd", jobs: list[_Job],
                 write: Callable[[ObjectReceiveStream], AsyncIterator[str]], close: Callable[[], None]) -> None:
        super().__init__((), media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                       "X-Accel-Buffering": "no"})
        self.front, self.jobs, self.write, self.close = front, jobs, write, close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with self.front.events(self.jobs) as source:
                self.body_iterator = self.write(source)
                await super().__call__(scope, receive, send)
        finally:
            self.close()


def _failure(item: TokenEvent | APIError) -> APIError | None:
    """What ends the whole answer: the engine stopping (an APIError) or a sub-request's error event."""
    if isinstance(item, APIError):
        return item
    if item.finish_reason == "error":
        return APIError(500, f"generation failed: {item.error}")
    return None


def _bad_param(err: ParamError, endpoint: Endpoint) -> APIError:
    """The 400 for an out-of-range setting, naming its request field (the prompt's and the logprobs' differ)."""
    names = {"prompt": endpoint.prompt_field, "logprobs": endpoint.logprobs_field}
    return APIError(400, str(err), names.get(err.param, err.param))


def _refuse_unknown(body: "BaseModel") -> None:
    """A 400 for any field this server does not implement (with a value other than its "off" one): never ignored."""
    for name, value in (body.model_extra or {}).items():
        if name not in UNSUPPORTED_UNLESS:
            raise APIError(400, f"unknown field '{name}': this server refuses the fields it does not implement "
                                "rather than ignore them", name)
        if value not in UNSUPPORTED_UNLESS[name]:
            raise APIError(400, f"'{name}' is not supported by this server (got {value!r})", name)


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
        self.in_flight = 0  # engine requests admitted and not yet answered
        self.count_lock = threading.Lock()
        self.rejected: Counter = Counter()  # refusals by reason, for /metrics
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._token_texts: dict[int, str] = {}  # token id -> its text alone (log-probability answers)

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

    @property
    def _tokenizing(self) -> anyio.CapacityLimiter:
        return self._limiter("tokenize", MAX_TOKENIZING_THREADS)

    def reject(self, reason: str) -> None:
        """Count a refused request by reason (unauthorized, body_too_large, queue_full, invalid, not_found, ...)."""
        self.rejected[reason] += 1

    def admit(self, count: int = 1, param: str | None = None) -> _Admission:
        """Count `count` engine requests in flight, or refuse them: a 429 while the bound is reached, a 400 if one
        request alone asks for more than the bound."""
        limit = self.policy.max_queued_requests
        if count > limit:
            raise APIError(400, f"this request asks for {count} generations (prompts x n); the server's limit is "
                                f"{limit} in flight (--max-queued-requests)", param)
        with self.count_lock:
            if self.in_flight + count > limit:
                raise APIError(429, f"the server is at its limit of {limit} requests in flight "
                                    f"(--max-queued-requests); retry after {RETRY_AFTER_S} s",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            self.in_flight += count
        return _Admission(self, count)

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

    def _encode(self, text: str, add_special_tokens: bool | None) -> list[int]:
        """A string's token ids; add_special_tokens None: the tokenizer's default."""
        if add_special_tokens is None:
            return list(self.tokenizer.encode(text))
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def completion_prompts(self, prompt: str | list, add_special_tokens: bool | None = None) -> list[_Prompt]:
        """The prompts of a completions request: a string, token ids, or a list of either (one choice each)."""
        several = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
        prompts = []
        for one in (prompt if several else [prompt]):
            if isinstance(one, str):
                prompts.append(_Prompt(self._encode(one, add_special_tokens), one))
            else:
                self._check_token_ids(one, "prompt")
                prompts.append(_Prompt(list(one)))
        return prompts

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    add_special_tokens: bool = False) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template (by default with the assistant's turn
        opened, and no special tokens added on top of the template's: vLLM's defaults)."""
        if not messages:
            raise APIError(400, "'messages' must hold at least one message", "messages")
        plain = [{"role": message.role, "content": self._message_text(i, message)}
                 for i, message in enumerate(messages)]
        try:
            if add_special_tokens:
                text = self.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt,
                                                          tokenize=False)
                return self._encode(text, True)
            ids = self.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True, return_dict=False)
        except Exception as err:  # the template is the judge of a conversation's shape; any failure is the input's
            raise APIError(400, f"messages do not fit the model's chat template: {err}", "messages") from None
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        return list(ids)

    @staticmethod
    def _message_text(i: int, message: ChatMessage) -> str:
        """A message's text; keys other than role and content (name, tool_calls, ...) are refused unless null."""
        for key, value in (message.model_extra or {}).items():
            if value is not None:
                raise APIError(400, f"messages[{i}].{key} is not supported by this server (a message has a 'role' "
                                    "and a 'content')", "messages")
        content = message.content
        if isinstance(content, list):
            for part in content:
                extra = [key for key, value in (part.model_extra or {}).items() if value is not None]
                if part.type != "text" or part.text is None or extra:
                    raise APIError(400, f"messages[{i}].content: only text parts are supported, got a part of type "
                                        f"{part.type!r}{' with ' + ', '.join(extra) if extra else ''}", "messages")
            content = "\n".join(part.text for part in content)
        return content or ""

    async def prompts(self, body: SamplingRequest, endpoint: Endpoint) -> list[_Prompt]:
        """The request's prompts as token ids, tokenised (or chat-templated) in a worker thread: a long prompt never
        stalls other streams or /health."""
        if endpoint.chat:
            generation = body.add_generation_prompt is not False
            ids = await anyio.to_thread.run_sync(self.chat_prompt, body.messages, generation,
                                                 limiter=self._tokenizing)
            return [_Prompt(ids)]
        return await anyio.to_thread.run_sync(self.completion_prompts, body.prompt, body.add_special_tokens,
                                              limiter=self._tokenizing)

    def token_text(self, token_id: int) -> str:
        """A token's text decoded alone (cached: log-probability answers show it for every alternative)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _prompt_text(self, prompt: _Prompt) -> str:
        """The prompt as echoed: the string sent, or the token ids decoded."""
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.ids, skip_special_tokens=False)

    # ---- vLLM's tokenizer routes ------------------------------------------------------------------------------

    async def tokenize(self, body: TokenizeRequest) -> dict:
        """POST /tokenize: a prompt (special tokens added by default) or messages (the chat template, by default
        with the generation prompt and no special tokens on top) -> tokens, count and max_model_len, as vLLM."""
        self.adapter_for(body.model)
        _refuse_unknown(body)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either 'prompt' or 'messages'", "prompt")
        if body.prompt is not None:
            if body.add_generation_prompt is not None:
                raise APIError(400, "'add_generation_prompt' applies to 'messages' only", "add_generation_prompt")
            ids = await anyio.to_thread.run_sync(self._encode, body.prompt, body.add_special_tokens,
                                                 limiter=self._tokenizing)
        else:
            ids = await anyio.to_thread.run_sync(self.chat_prompt, body.messages, body.add_generation_prompt
                                                 is not False, bool(body.add_special_tokens),
                                                 limiter=self._tokenizing)
        return {"count": len(ids), "max_model_len": self.loop.max_model_len, "tokens": ids}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        """POST /detokenize: token ids -> their text (`prompt`), as vLLM."""
        self.adapter_for(body.model)
        _refuse_unknown(body)
        self._check_token_ids(body.tokens, "tokens")
        text = await anyio.to_thread.run_sync(self.tokenizer.decode, body.tokens, limiter=self._tokenizing)
        return {"prompt": text}

    @staticmethod
    def version() -> dict:
        """GET /version: this package's version (vLLM answers its own)."""
        return {"version": importlib.metadata.version("megatron-bdlora")}

    # ---- parameters -------------------------------------------------------------------------------------------

    @staticmethod
    def _choices_per_prompt(body: SamplingRequest) -> int:
        n = 1 if body.n is None else body.n
        if n < 1:
            raise APIError(400, f"'n' must be an integer >= 1, got {n}", "n")
        if body.best_of not in (None, n):
            raise APIError(400, f"'best_of' is not supported (vLLM's V1 engine has none): it may only equal n={n}, "
                                f"got {body.best_of}", "best_of")
        return n

    @staticmethod
    def _prompt_count(body: SamplingRequest) -> int:
        """How many prompts a request holds, before tokenising (admission counts engine requests)."""
        prompt = getattr(body, "prompt", None)
        return len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1

    def reply(self, body: SamplingRequest, endpoint: Endpoint, model: str) -> _Reply:
        """What the answer carries, from the request's fields; 400 for fields or combinations not served."""
        _refuse_unknown(body)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
        if body.prompt_logprobs is not None and body.stream:
            raise APIError(400, "'prompt_logprobs' are not available with 'stream': true (as vLLM)",
                           "prompt_logprobs")
        if endpoint.chat:
            if body.top_logprobs and not body.logprobs:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
            top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            top = body.logprobs
        options = body.stream_options or None
        include_usage = bool(options and options.include_usage)
        meta = {"id": f"{endpoint.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        return _Reply(endpoint, meta, echo=not endpoint.chat and bool(body.echo), top=top,
                      prompt_logprobs=body.prompt_logprobs is not None, include_usage=include_usage,
                      continuous_usage=include_usage and bool(options.continuous_usage_stats))

    def params(self, body: SamplingRequest, reply: _Reply, prompt_tokens: int) -> GenerationParams:
        """Checked decoding settings of one prompt; without max_tokens, the endpoint's default."""
        endpoint = reply.endpoint
        limit = self.loop.max_model_len
        if prompt_tokens >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt has "
                                f"{prompt_tokens} tokens (at least 1 token must be left to generate)",
                           endpoint.prompt_field)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            default = endpoint.default_max_tokens
            max_tokens = default if default is not None else limit - prompt_tokens
        if max_tokens == 0 and not reply.echo:
            raise APIError(400, "max_tokens must be an integer >= 1 (0 only with 'echo': true, to score the prompt "
                                "without generating)", "max_tokens")
        prompt_logprobs = body.prompt_logprobs
        if prompt_logprobs is None and reply.echo and (reply.top is not None or max_tokens == 0):
            prompt_logprobs = reply.top or 0  # echo's prompt scores (vLLM); max_tokens 0 only scores the prompt
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        self._check_stops(stop, tuple(body.stop_token_ids or ()))
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=self._temperature(body.temperature),
            stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            logprobs=reply.top,
            prompt_logprobs=prompt_logprobs,
            logit_bias=self._logit_bias(body.logit_bias),
            **{name: getattr(body, name) for name in _PASSED_THROUGH if getattr(body, name) is not None},
        )
        self._check(params, prompt_tokens, endpoint)
        return params

    def _check(self, params: GenerationParams, prompt_tokens: int, endpoint: Endpoint) -> None:
        try:
            params.check(prompt_tokens, self.loop.max_model_len, len(self.tokenizer))
        except ParamError as err:
            raise _bad_param(err, endpoint) from None

    @staticmethod
    def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias (token ids as JSON object keys) as (id, bias) pairs; ranges are check()'s."""
        pairs = []
        for key, value in (bias or {}).items():
            try:
                pairs.append((int(key), value))
            except ValueError:
                raise APIError(400, f"'logit_bias' keys must be token ids (integers), got {key!r}",
                               "logit_bias") from None
        return tuple(pairs)

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

    def jobs(self, body: SamplingRequest, reply: _Reply, prompts: list[_Prompt], n: int) -> list[_Job]:
        """One engine request per choice, in choice order (prompt index * n + j); with a seed, choice j of each
        prompt uses seed + j (vLLM V1's parallel sampling), each checked before any is submitted."""
        jobs = []
        for prompt in prompts:
            params = self.params(body, reply, len(prompt.ids))
            for j in range(n):
                own = params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)
                if own is not params:
                    self._check(own, len(prompt.ids), reply.endpoint)
                jobs.append(_Job(len(jobs), prompt, own))
        return jobs

    # ---- generation -------------------------------------------------------------------------------------------

    async def serve(self, request: Request, endpoint: Endpoint, body: SamplingRequest) -> Response:
        """A completions or chat request from its parsed body to its answer, its engine requests counted in flight
        from admission until the answer is complete (or its stream ends)."""
        n = self._choices_per_prompt(body)
        prompt_count = self._prompt_count(body)
        admission = self.admit(prompt_count * n, "n" if n > 1 else endpoint.prompt_field)
        jobs: list[_Job] = []

        def close() -> None:
            self._abort(jobs)
            admission.release()

        try:
            adapter, model = self.adapter_for(body.model)
            reply = self.reply(body, endpoint, model)
            prompts = await self.prompts(body, endpoint)
            jobs.extend(self.jobs(body, reply, prompts, n))
            await self._submit(jobs, adapter, model, endpoint)
        except BaseException:
            close()
            raise
        if body.stream:
            return _FanInStream(self, jobs, lambda source: self._stream(source, jobs, reply), close)
        try:
            return await self._complete(request, jobs, reply)
        finally:
            close()

    async def _submit(self, jobs: list[_Job], adapter: str | None, model: str, endpoint: Endpoint) -> None:
        """Submit every job (in a worker thread); a refusal of one is the request's error (the caller cancels the
        others)."""
        try:
            await anyio.to_thread.run_sync(self._submit_all, jobs, adapter, limiter=self.limiter)
        except KeyError:
            raise APIError(404, f"The model `{model}` does not exist.", "model") from None
        except ParamError as err:
            raise _bad_param(err, endpoint) from None
        except ValueError as err:
            raise APIError(400, str(err)) from None
        except RuntimeError as err:  # shutting down, or the engine died
            raise APIError(503, f"the serving engine is not accepting requests: {err}") from None

    def _submit_all(self, jobs: list[_Job], adapter: str | None) -> None:
        for job in jobs:
            job.request_id, job.events = self.loop.submit(job.prompt.ids, adapter, job.params)

    def _abort(self, jobs: list[_Job]) -> None:
        """Cancel the submitted requests no one waits for any more (each at most once, only if still running)."""
        for job in jobs:
            if job.events is not None and not job.done and not job.aborted:
                job.aborted = True
                self.loop.cancel(job.request_id)

    async def _next_event(self, job: _Job) -> TokenEvent:
        """The job's next event, waited for in a worker thread; 503 if the engine stops meanwhile."""
        while True:
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

    async def _forward(self, job: _Job, sink: ObjectSendStream) -> None:
        """Pass a job's events (or the engine's failure) on to the answer, until its last one."""
        while not job.done:
            try:
                event = await self._next_event(job)
            except APIError as err:
                await sink.send((job, err))
                return
            await sink.send((job, event))

    @asynccontextmanager
    async def events(self, jobs: list[_Job]) -> AsyncIterator[ObjectReceiveStream]:
        """Every job's events on one stream, as (job, TokenEvent | APIError), one forwarding task per job (stopped on
        exit)."""
        sink, source = anyio.create_memory_object_stream(math.inf)
        failure = None
        async with anyio.create_task_group() as tasks:
            for job in jobs:
                tasks.start_soon(self._forward, job, sink)
            try:
                yield source
            except Exception as err:  # raised below as itself, not inside the task group's ExceptionGroup
                failure = err
            finally:
                tasks.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _complete(self, request: Request, jobs: list[_Job], reply: _Reply) -> Response:
        """The whole answer once every job has finished; 499 if the client left first (Starlette does not report a
        disconnect to answers that are not streamed, so it is checked every POLL_S)."""
        try:
            async with self.events(jobs) as source:
                await self._gather(request, source, len(jobs))
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; the requests are cancelled by the caller
        answer = await anyio.to_thread.run_sync(self._whole_answer, jobs, reply, limiter=self._tokenizing)
        return JSONResponse(answer)

    @staticmethod
    async def _gather(request: Request, source: ObjectReceiveStream, pending: int) -> None:
        checked = time.monotonic()
        while pending:
            item = None
            with anyio.move_on_after(POLL_S):
                job, item = await source.receive()
            if time.monotonic() - checked >= POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise _ClientGone()
            if item is None:
                continue
            failure = _failure(item)
            if failure is not None:
                raise failure
            job.record(item)
            pending -= item.finished

    def _whole_answer(self, jobs: list[_Job], reply: _Reply) -> dict:
        endpoint = reply.endpoint
        choices = []
        for job in jobs:
            text, ids, entries = self._with_echo(job, reply, "".join(job.texts), job.token_ids, job.logprobs)
            choice = endpoint.choice(job.index, text, job.finish_reason, self._logprobs(reply, ids, entries))
            if reply.prompt_logprobs and not endpoint.chat:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(job.prompt_logprobs, self.token_text)
            choices.append(choice)
        answer = {**reply.meta, "object": endpoint.object, "choices": choices, "usage": self._usage(jobs)}
        if reply.prompt_logprobs and endpoint.chat:  # vLLM puts chat's prompt scores on the answer (one prompt)
            answer["prompt_logprobs"] = vllm_prompt_logprobs(jobs[0].prompt_logprobs, self.token_text)
        return answer

    def _with_echo(self, job: _Job, reply: _Reply, text: str, ids: list[int],
                   entries: list[TokenLogprob]) -> tuple[str, list[int], list]:
        """Text, token ids and log-probabilities with the prompt's before them when echoed (once per choice)."""
        if not reply.echo or job.echoed:
            return text, ids, entries
        job.echoed = True
        prompt_entries = list(job.prompt_logprobs or ()) if reply.top is not None else []
        return self._prompt_text(job.prompt) + text, [*job.prompt.ids, *ids], [*prompt_entries, *entries]

    def _logprobs(self, reply: _Reply, ids: list[int], entries: list, text_offset: int = 0) -> dict | None:
        """A choice's (or chunk's) logprobs in the endpoint's shape; None unless asked for."""
        if reply.top is None:
            return None
        if reply.endpoint.chat:
            return chat_logprobs(entries, self.token_text)
        return completion_logprobs(ids, entries, reply.top, self.token_text, text_offset)

    @staticmethod
    def _usage(jobs: list[_Job]) -> dict:
        """Usage summed over the choices, each prompt's tokens counted once (as vLLM)."""
        prompts = {id(job.prompt): len(job.prompt.ids) for job in jobs}
        return usage(sum(prompts.values()), sum(job.completion_tokens for job in jobs))

    async def _stream(self, source: ObjectReceiveStream, jobs: list[_Job], reply: _Reply) -> AsyncIterator[str]:
        """The answer as server-sent events: chunks in the order the engine produces them, each naming its choice;
        an error event ends it if any choice fails."""
        endpoint = reply.endpoint
        head = {**reply.meta, "object": endpoint.chunk_object}
        extra = {"usage": None} if reply.include_usage else {}
        if endpoint.chat:
            for job in jobs:
                yield sse({**head, "choices": [endpoint.chunk_choice(job.index, "", None, first=True)], **extra})
        pending = len(jobs)
        while pending:
            job, item = await source.receive()
            failure = _failure(item)
            if failure is not None:
                yield sse(error_body(failure.status, failure.message))
                break
            job.record(item)
            pending -= item.finished
            choice = self._chunk_choice(job, item, reply)
            if choice is not None:
                if reply.continuous_usage:
                    extra = {"usage": usage(len(job.prompt.ids), job.completion_tokens)}
                yield sse({**head, "choices": [choice], **extra})
        else:
            if reply.include_usage:
                yield sse({**head, "choices": [], "usage": self._usage(jobs)})
        yield SSE_DONE

    def _chunk_choice(self, job: _Job, event: TokenEvent, reply: _Reply) -> dict | None:
        """One event as a chunk's choice (the prompt before the first one when echoed); None if it has nothing to
        say (no text, no token whose logprob was asked for, not the last)."""
        text, ids, entries = self._with_echo(job, reply, event.text, list(event.token_ids), list(event.logprobs))
        if not (text or event.finished or (reply.top is not None and ids)):
            return None
        logprobs = self._logprobs(reply, ids, entries, job.streamed_chars)
        job.streamed_chars += len(text)
        return reply.endpoint.chunk_choice(job.index, text, event.finish_reason, logprobs)

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
