"""OpenAI-compatible HTTP front end of a ServingLoop (rank 0), with vLLM's routes, request bodies and answers.

The app: routes, error answers and Prometheus metrics.

  POST /v1/completions          prompt: a string or a list of token ids (one prompt per request)
  POST /v1/chat/completions     messages, formatted with the tokenizer's chat template
                                both: `stream: true` for server-sent events ending in `data: [DONE]`
  GET  /v1/models[/{id}]        the base model and the adapters (`parent` = base, `root` = adapter path)
  POST /v1/load_lora_adapter    {"lora_name", "lora_path"};  POST /v1/unload_lora_adapter {"lora_name"}
  GET  /health                  200 while the engine runs;   GET /metrics  Prometheus text format

Bad input is answered before it reaches the engine, as OpenAI's error JSON
`{"error": {"message", "type", "param", "code"}}` with status 400 (404 for an unknown model or adapter). Request
bodies are in protocol.py, errors in errors.py, and what happens between a request and the engine in frontend.py.
"""

from __future__ import annotations

import logging
import re
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
from megatron_bdlora.inference.protocol import (
    CHAT,
    COMPLETION,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRARequest,
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
        invalid = validation_error(list(err.errors()))
        return error_response(invalid.status, invalid.message, invalid.param)

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
        params = front.params(body, COMPLETION, len(prompt_ids), body.max_tokens)
        return await front.generate(request, COMPLETION, model, adapter, prompt_ids, params, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        adapter, model = front.adapter_for(body.model)
        prompt_ids = front.chat_prompt(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = front.params(body, CHAT, len(prompt_ids), max_tokens)
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
