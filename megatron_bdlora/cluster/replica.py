"""A Ray Serve replica = one TP group of the single server (engine_process.py) that requests are forwarded to.

Bodies and answers pass through as bytes: the engine's own front end (routes.py) validates, answers and streams,
so the cluster speaks exactly the single server's protocol without a second copy of it. What the replica adds:
- adapter multiplexing: every request for an adapter calls the `@serve.multiplexed` loader with its name first, so
  Serve's router learns which replica holds which adapters and keeps sending an adapter's traffic to them; a
  replica holds at most `adapters_per_replica` names (the engine's device slots, --max-loras), dropped LRU;
- the runtime adapter log: before a request, loads/unloads accepted at the ingress since the replica last looked
  are replayed on its engine, so a replica started later (autoscaling, a replacement) knows them too;
- health: check_health fails once the engine process is gone or answers 503, so Serve replaces the replica;
- reports: health and the engine's /metrics text pushed to the board every interval, for the ingress's /health
  and /metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator

import aiohttp
from ray import serve

from megatron_bdlora.cluster.engine_process import EngineProcess
from megatron_bdlora.cluster.messages import (
    AdapterOp,
    Answer,
    EngineUnavailable,
    Forwarded,
    Head,
    OpKind,
    ReplicaReport,
    ReplicaSpec,
)

log = logging.getLogger("ray.serve")

# headers that describe one hop, not the message: aiohttp and the ASGI server set their own
_HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"})


def end_to_end(headers: Any) -> tuple[tuple[str, str], ...]:
    """The headers worth passing on (content type, auth, Retry-After, ...), lower-cased."""
    return tuple((k.lower(), v) for k, v in headers.items() if k.lower() not in _HOP_HEADERS)


class EngineReplica:
    """One Serve replica: starts its engine, forwards requests to it, replays adapter changes, reports health."""

    async def __init__(self, spec: ReplicaSpec, board: Any, adapters_per_replica: int) -> None:
        self.spec, self.board = spec, board
        self.name = serve.get_replica_context().replica_id.unique_id
        # started on this (long-lived) thread: the engine's parent-death signal follows the thread that forked it
        self.engine = EngineProcess(spec.server_settings, spec.tp, spec.api_key, spec.cwd, spec.env)
        try:
            await asyncio.to_thread(self.engine.wait_ready, spec.startup_timeout_s)
        except BaseException:
            self.engine.stop(grace_s=5)
            raise
        self.engine_pid = self.engine.rank0_pid()
        self.session = aiohttp.ClientSession(base_url=self.engine.url, timeout=aiohttp.ClientTimeout(total=None),
                                             auto_decompress=False)
        self.applied = 0  # entries of the ingress's adapter log already replayed here
        self.ops_lock = asyncio.Lock()
        self.stopping = False

        async def hold(adapter: str) -> str:  # the engine loads the adapter on first use: nothing to do here
            return adapter

        # built per instance: the limit comes from the config (Serve detects instance-level multiplexing too)
        self.hold_adapter = serve.multiplexed(max_num_models_per_replica=adapters_per_replica)(hold)
        self.reporter = asyncio.get_running_loop().create_task(self._report_forever())

    # ---- requests -------------------------------------------------------------------------------------------

    async def forward(self, req: Forwarded) -> Answer:
        """A whole answer; EngineUnavailable when the engine did not give one (the ingress retries elsewhere)."""
        await self._prepare(req)
        try:
            async with self._send(req) as resp:
                return Answer(Head(resp.status, end_to_end(resp.headers)), await resp.read())
        except aiohttp.ClientError as err:
            raise self._unavailable(err) from None

    async def stream(self, req: Forwarded) -> AsyncIterator[Head | bytes]:
        """The answer's Head, then its body as it arrives (server-sent events for `stream: true`)."""
        await self._prepare(req)
        try:
            async with self._send(req) as resp:
                yield Head(resp.status, end_to_end(resp.headers))
                async for chunk in resp.content.iter_any():
                    yield chunk
        except aiohttp.ClientError as err:
            raise self._unavailable(err) from None

    def _send(self, req: Forwarded) -> Any:
        return self.session.request(req.method, req.path, headers=dict(req.headers), data=req.body)

    async def _prepare(self, req: Forwarded) -> None:
        if not self.engine.alive():
            raise self._unavailable(None)
        model = serve.get_multiplexed_model_id()
        if model:
            await self.hold_adapter(model)
        await self._catch_up(req.ops)

    def _unavailable(self, err: Exception | None) -> EngineUnavailable:
        state = "running" if self.engine.alive() else f"exited with code {self.engine.proc.returncode}"
        why = f": {type(err).__name__}: {err}" if err is not None else ""
        return EngineUnavailable(f"replica {self.name}: the engine ({state}) gave no answer{why}")

    # ---- runtime adapters -----------------------------------------------------------------------------------

    async def _catch_up(self, ops: tuple[AdapterOp, ...]) -> None:
        """Replay the log's entries this engine has not seen yet, in order (an op it refuses is logged and skipped:
        the ingress accepted it on another replica, so the engine's state, not the log, is what is odd here)."""
        if self.applied >= len(ops):
            return
        async with self.ops_lock:
            for op in ops[self.applied:]:
                status, text = await self._apply(op)
                if status != 200:
                    log.warning("replica %s: replaying %s %s answered %d: %s", self.name, op.kind.value, op.name,
                                status, text)
                self.applied += 1

    async def apply_op(self, req: Forwarded) -> Answer:
        """A load/unload sent by the ingress: catch up with the log before it, then forward it; on success it is
        the log's next entry, already applied here."""
        await self._catch_up(req.ops)
        async with self.ops_lock:
            answer = await self.forward(Forwarded(req.method, req.path, req.headers, req.body))
            if answer.head.status == 200:
                self.applied = len(req.ops) + 1
            return answer

    async def _apply(self, op: AdapterOp) -> tuple[int, str]:
        path = "/v1/load_lora_adapter" if op.kind is OpKind.LOAD else "/v1/unload_lora_adapter"
        body = {"lora_name": op.name, **({"lora_path": op.path} if op.kind is OpKind.LOAD else {})}
        headers = {"content-type": "application/json"}
        if self.spec.api_key is not None:
            headers["authorization"] = f"Bearer {self.spec.api_key}"
        try:
            async with self.session.post(path, data=json.dumps(body), headers=headers) as resp:
                return resp.status, await resp.text()
        except aiohttp.ClientError as err:
            raise self._unavailable(err) from None

    # ---- health and reports ---------------------------------------------------------------------------------

    async def _engine_health(self) -> tuple[bool, str]:
        if not self.engine.alive():
            return False, f"the engine exited with code {self.engine.proc.returncode}"
        try:
            async with self.session.get("/health", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status == 503:
                    return False, (await resp.text())[:300]
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:  # busy is not dead: its watchdog exits if dead
            return self.engine.alive(), f"/health did not answer: {type(err).__name__}"
        return True, ""

    async def check_health(self) -> None:
        """Serve's probe: raising marks the replica unhealthy, and Serve replaces it."""
        healthy, detail = await self._engine_health()
        if not healthy:
            raise RuntimeError(f"replica {self.name}: {detail}")

    async def _report_forever(self) -> None:
        while not self.stopping:
            try:
                await self.board.report.remote(await self.report())
            except Exception as err:  # the board restarting: the next report gets through
                log.warning("replica %s: report failed: %s", self.name, err)
            await asyncio.sleep(self.spec.report_interval_s)

    async def report(self) -> ReplicaReport:
        """This replica's health and its engine's metrics (Prometheus text) right now."""
        healthy, detail = await self._engine_health()
        text = ""
        if self.engine.alive():
            try:
                async with self.session.get("/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    text = await resp.text()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
        return ReplicaReport(self.name, healthy, text, time.time(), detail, self.engine_pid)

    async def __del__(self) -> None:
        """Serve stops the replica (scale-down, shutdown, replacement): drain the engine, then forget the board."""
        self.stopping = True
        self.reporter.cancel()
        await asyncio.to_thread(self.engine.stop)
        await self.session.close()
        try:
            await self.board.forget.remote(self.name)
        except Exception:  # the whole application is going away
            pass
