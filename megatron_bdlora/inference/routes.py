"""OpenAI-compatible HTTP front end of a ServingLoop (rank 0), with vLLM's routes, request bodies and answers.

The app: routes, error answers and Prometheus metrics.

  POST /v1/completions          prompt: a string, token ids, or a list of either (one choice per prompt and n);
                                echo, logprobs (legacy shape), vLLM's prompt_logprobs
  POST /v1/chat/completions     messages, formatted with the tokenizer's chat template; logprobs / top_logprobs
                                both: n, penalties, logit_bias, min_tokens, min_p, ...; `stream: true` for
                                server-sent events ending in `data: [DONE]`
  POST /tokenize, /detokenize   vLLM's tokenizer routes (prompt or messages -> tokens; tokens -> prompt)
  GET  /version                 {"version": ...}
  GET  /v1/models[/{id}]        the base model and the adapters (`parent` = base, `root` = adapter path)
  POST /v1/load_lora_adapter    {"lora_name", "lora_path"};  POST /v1/unload_lora_adapter {"lora_name"}
                                (404 unless --enable-lora-runtime-updating; paths only under --lora-root)
  GET  /health                  200 while the engine steps;  GET /metrics  Prometheus text format

With an API key every /v1/* route and /tokenize, /detokenize need `Authorization: Bearer KEY` (401 otherwise), as
current vLLM guards every route but its public ones; /health, /metrics and /version stay open.
Bad input is answered before it reaches the engine, as OpenAI's error JSON
`{"error": {"message", "type", "param", "code"}}` with status 400 (404 for an unknown model or adapter, 409 for a
concurrent load/unload of one adapter, 413 for a body over the limit, 429 with Retry-After when the requests in
flight are at their bound). Request bodies are in protocol.py, errors in errors.py, limits in policy.py, the key and
the body limit in http_guard.py, and what happens between a request and the engine in frontend.py.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException as StarletteHTTPException

from megatron_bdlora.inference.errors import APIError, error_response, validation_error
from megatron_bdlora.inference.frontend import OpenAIFrontEnd
from megatron_bdlora.inference.http_guard import RequestGuard
from megatron_bdlora.inference.policy import ServerPolicy
from megatron_bdlora.inference.protocol import (
    CHAT,
    COMPLETION,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRARequest,
    TokenizeRequest,
    UnloadLoRARequest,
)

if TYPE_CHECKING:
    from megatron_bdlora.inference.serving_loop import ServingLoop

log = logging.getLogger(__name__)

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
    "requests_failed_total": "Requests that ended with an error inside the engine (the others went on)",
}
_REJECT_REASONS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 409: "conflict",
                   413: "body_too_large", 429: "queue_full"}


class _ServerCollector(Collector):
    """Prometheus view read at scrape time: loop.metrics() (`*_total` keys are counters, the rest gauges), the front
    end's refusals and requests in flight, and vLLM's `vllm:lora_requests_info` (which LoRA-affinity routers read)."""

    def __init__(self, front: OpenAIFrontEnd):
        self.front, self.loop = front, front.loop

    def collect(self):
        for key, value in sorted(self.loop.metrics().items()):
            name = "bdlora_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            doc = _METRIC_HELP.get(key, f"serving loop metric {key}")
            if key.endswith("_total"):
                yield CounterMetricFamily(name.removesuffix("_total"), doc, value=float(value))
            else:
                yield GaugeMetricFamily(name, doc, value=float(value))
        rejected = CounterMetricFamily("bdlora_requests_rejected", "Requests refused before the engine, by reason",
                                       labels=["reason"])
        for reason in sorted({*_REJECT_REASONS.values(), *self.front.rejected}):
            rejected.add_metric([reason], float(self.front.rejected[reason]))
        yield rejected
        yield GaugeMetricFamily("bdlora_requests_in_flight", "Engine requests (one per prompt and choice) admitted "
                                "and not yet answered (bounded by --max-queued-requests)",
                                value=float(self.front.in_flight))
        info = self.loop.lora_info()
        lora = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests (vLLM's gauge; the "
                                 "value is the time of the scrape)",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        lora.add_metric([str(info["max_lora"]), ",".join(info["running"]), ",".join(info["waiting"])], time.time())
        yield lora


def build_app(loop: "ServingLoop", *, served_model_name: str | None = None, base_root: str | None = None,
              adapter_paths: Mapping[str, str] | None = None, policy: ServerPolicy | None = None) -> FastAPI:
    """The OpenAI-compatible app over a started ServingLoop; names/paths default to the loop's own, limits and
    permissions to ServerPolicy's defaults."""
    front = OpenAIFrontEnd(loop, served_model_name, base_root, adapter_paths, policy)
    policy = front.policy
    app = FastAPI(title="megatron-bdlora", description=__doc__.split("\n")[0])
    app.add_middleware(RequestGuard, api_key=policy.api_key, max_body_bytes=policy.max_request_bytes,
                       on_reject=front.reject)
    app.state.front = front
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ServerCollector(front))

    def answer(status: int, message: str, param: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
        if status in _REJECT_REASONS:
            front.reject(_REJECT_REASONS[status])
        return error_response(status, message, param, headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return answer(err.status, err.message, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        invalid = validation_error(list(err.errors()))
        return answer(invalid.status, invalid.message, invalid.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return answer(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(err).__name__}: {err}")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await front.serve(request, COMPLETION, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await front.serve(request, CHAT, body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        return await front.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        return await front.detokenize(body)

    @app.get("/version")
    async def version() -> dict:
        return front.version()

    @app.get("/v1/models")
    async def models() -> dict:
        return front.models()

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        front.adapter_for(model)
        return front.model_card(model if model in front.loop.adapter_names() else front.base_name)

    if policy.enable_lora_runtime_updating:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRARequest) -> PlainTextResponse:
            return await front.load_adapter(body.lora_name, body.lora_path)

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRARequest) -> PlainTextResponse:
            return await front.unload_adapter(body.lora_name)
    else:  # refused before the body is read, as vLLM, which has no such routes then
        @app.post("/v1/load_lora_adapter")
        @app.post("/v1/unload_lora_adapter")
        async def runtime_updating_disabled() -> Response:
            front.check_runtime_updating()

    @app.get("/health")
    async def health() -> Response:
        if not loop.healthy():
            return error_response(503, "the serving engine is not running")
        stalled = time.monotonic() - loop.last_step_at
        if stalled > policy.engine_step_timeout:  # a rank hung in a collective, or a step that never ends
            return error_response(503, f"the serving engine has not finished a step for {stalled:.0f} s "
                                       f"(--engine-step-timeout {policy.engine_step_timeout:g})")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
