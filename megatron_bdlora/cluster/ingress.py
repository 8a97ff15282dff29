"""The cluster's HTTP front: the single server's routes, bodies, errors and streams, in front of N engine replicas.

Requests are forwarded as they came (engine_replica answers them with the single server's own front end), routed
by adapter: the `model` of a request that names a known adapter becomes Serve's multiplexed model id, so Serve
sends it to a replica that already holds that adapter; base-model requests (and unknown names, which the engine
answers 404) go to any replica. What is the ingress's own:
- failover: a request whose replica gave no answer (its engine or actor died) is sent again, to whichever replica
  Serve picks, until `retry_window_s` has passed (then 503). A stream is retried only until its first bytes; one
  that already sent tokens ends with an error event, as the single server's streams do;
- runtime adapters: POST /v1/load_lora_adapter and /v1/unload_lora_adapter go to one replica, which answers with
  the single server's gating (404 unless enabled, --lora-root, 400/409); an accepted change joins the adapter log
  that every request carries, and each replica replays what it has not seen before serving it. The log lives in
  this (single) ingress replica: an ingress restart forgets runtime changes, as a single server's restart does;
- /health and /metrics over all replicas (from their reports on the board).
The API key and the body limit are checked here first, by the single server's own middleware (http_guard.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from megatron_bdlora.cluster.messages import AdapterOp, EngineUnavailable, Forwarded, Head, OpKind
from megatron_bdlora.cluster.metrics import CONTENT_TYPE, cluster_families, exposition, labelled_families
from megatron_bdlora.inference.errors import error_body, error_response
from megatron_bdlora.inference.http_guard import RequestGuard
from megatron_bdlora.inference.protocol import SSE_DONE, sse

log = logging.getLogger("ray.serve")
T = TypeVar("T")
# the replica or its engine is gone: nothing was answered, so sending the request again is safe
RETRYABLE = (EngineUnavailable, RayActorError, ActorUnavailableError)
_OPS = {"/v1/load_lora_adapter": OpKind.LOAD, "/v1/unload_lora_adapter": OpKind.UNLOAD}


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs of the configuration."""

    adapters: tuple[str, ...]  # launch-time adapter names
    route_by_adapter: bool  # False: Ray's default routing (no multiplexing), the benchmark's baseline
    retry_window_s: float
    api_key: str | None
    max_request_bytes: int


class Unanswered(Exception):
    """No replica answered within the retry window."""


class ClusterFront:
    """Forwarding, retries, the adapter log, aggregated health and metrics: the ingress's logic, apart from Serve
    so that it runs (and is tested) over any pair of handles."""

    def __init__(self, engines: Any, board: Any, settings: IngressSettings) -> None:
        self.engines, self.board, self.settings = engines, board, settings
        self.ops: list[AdapterOp] = []
        self.adapters = set(settings.adapters)
        self.ops_lock = asyncio.Lock()
        self.retries = 0
        self.unanswered = 0
        self.rejected: Counter[str] = Counter()

    # ---- forwarding -----------------------------------------------------------------------------------------

    def route(self, body: bytes) -> tuple[Any, bool]:
        """(the engines' handle for this request, whether it asks for a stream)."""
        try:
            parsed = json.loads(body) if body else None
        except ValueError:  # the engine answers the 400
            parsed = None
        parsed = parsed if isinstance(parsed, dict) else {}
        model, stream = parsed.get("model"), parsed.get("stream") is True
        if self.settings.route_by_adapter and isinstance(model, str) and model in self.adapters:
            return self.engines.options(multiplexed_model_id=model), stream
        return self.engines, stream

    async def retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """call(), again while the replica it reached gives no answer, until the retry window has passed."""
        deadline = time.monotonic() + self.settings.retry_window_s
        delay = 0.1
        while True:
            try:
                return await call()
            except RETRYABLE as err:
                if time.monotonic() + delay > deadline:
                    self.unanswered += 1
                    raise Unanswered(f"no engine replica answered {what} within {self.settings.retry_window_s:g} s "
                                     f"(retry_window_s); last: {type(err).__name__}: {err}") from None
                self.retries += 1
                log.warning("retrying %s on another replica: %s", what, err)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    async def forward(self, fwd: Forwarded) -> Response:
        """The engine's answer to this request, from whichever replica gives one."""
        fwd = replace(fwd, ops=tuple(self.ops))
        handle, stream = self.route(fwd.body)
        what = f"{fwd.method} {fwd.path}"
        if stream:
            return await self.stream(handle, fwd, what)
        answer = await self.retrying(lambda: handle.forward.remote(fwd), what)
        return Response(answer.body, status_code=answer.head.status, headers=dict(answer.head.headers))

    async def stream(self, handle: Any, fwd: Forwarded, what: str) -> Response:
        """Retried until the engine sent its status and first bytes; after that a failure ends the stream with an
        error event (the client already has tokens)."""

        async def open_stream() -> tuple[Head, bytes, Any]:
            chunks = handle.options(stream=True).stream.remote(fwd)
            try:
                head = await chunks.__anext__()
                first = await anext(chunks, b"")
            except BaseException:
                chunks.cancel()
                raise
            return head, first, chunks

        head, first, chunks = await self.retrying(open_stream, what)

        async def body() -> AsyncIterator[bytes]:
            try:
                yield first
                async for chunk in chunks:
                    yield chunk
            except RETRYABLE as err:
                log.warning("%s: the replica failed mid-stream: %s", what, err)
                failed = error_body(503, f"the engine replica serving this stream failed: {err}")
                yield (sse(failed) + SSE_DONE).encode()
            finally:
                chunks.cancel()

        return StreamingResponse(body(), status_code=head.status, headers=dict(head.headers))

    async def change_adapters(self, fwd: Forwarded, kind: OpKind) -> Response:
        """A load/unload: one replica answers it (with the single server's checks); accepted, it joins the log."""
        async with self.ops_lock:  # one change at a time: the log's order is every replica's order
            fwd = replace(fwd, ops=tuple(self.ops))
            answer = await self.retrying(lambda: self.engines.apply_op.remote(fwd), fwd.path)
            if answer.head.status == 200:
                fields = json.loads(fwd.body)
                op = AdapterOp(kind, fields["lora_name"], fields.get("lora_path") if kind is OpKind.LOAD else None)
                self.ops.append(op)
                (self.adapters.add if kind is OpKind.LOAD else self.adapters.discard)(op.name)
        return Response(answer.body, status_code=answer.head.status, headers=dict(answer.head.headers))

    # ---- health and metrics ---------------------------------------------------------------------------------

    async def health(self) -> Response:
        """200 while at least one replica is healthy; the body lists every replica reporting."""
        reports = await self.board.current.remote()
        replicas = [{"replica": r.replica, "healthy": r.healthy, "engine_pid": r.engine_pid, "detail": r.detail}
                    for r in reports]
        if any(r.healthy for r in reports):
            return JSONResponse({"replicas": replicas})
        return JSONResponse({**error_body(503, "no healthy engine replica"), "replicas": replicas}, status_code=503)

    async def metrics(self) -> Response:
        reports = await self.board.current.remote()
        families = [*labelled_families(reports), *cluster_families(reports, self.retries, self.unanswered,
                                                                   self.rejected)]
        return Response(exposition(families), media_type=CONTENT_TYPE)


@serve.ingress()
class Ingress:
    """The one ingress replica of the application: a ClusterFront behind the routes of build_app."""

    def __init__(self, engines: Any, board: Any, settings: IngressSettings) -> None:
        self.front = ClusterFront(engines, board, settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self.front)


async def forwarded(request: Request) -> Forwarded:
    """The request as it came (path with its query, end-to-end headers, body), for a replica."""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    headers = tuple((k.lower(), v) for k, v in request.headers.items()
                    if k.lower() not in ("host", "content-length", "transfer-encoding", "connection"))
    return Forwarded(request.method, path, headers, await request.body())


def build_app(front: ClusterFront) -> FastAPI:
    """The ingress's routes over one ClusterFront (built on the replica, after its constructor)."""
    app = FastAPI(title="megatron-bdlora cluster")
    settings = front.settings
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=settings.max_request_bytes,
                       on_reject=lambda reason: front.rejected.update([reason]))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 413:
            front.rejected.update(["body_too_large"])
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Unanswered)
    async def _unanswered(request: Request, err: Unanswered) -> JSONResponse:
        return error_response(503, str(err), headers={"Retry-After": "1"})

    @app.get("/health")
    async def health() -> Response:
        return await front.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return await front.metrics()

    for path, kind in _OPS.items():
        app.add_api_route(path, _changer(front, kind), methods=["POST"])

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
    async def forward(request: Request) -> Response:
        return await front.forward(await forwarded(request))

    return app


def _changer(front: ClusterFront, kind: OpKind) -> Callable[[Request], Awaitable[Response]]:
    async def change(request: Request) -> Response:
        return await front.change_adapters(await forwarded(request), kind)

    return change
