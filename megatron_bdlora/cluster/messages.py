"""What the ingress and the engine replicas send each other through Ray Serve: small frozen dataclasses and enums,
pickled by Ray, never tagged tuples."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EngineUnavailable(RuntimeError):
    """A replica's engine process is gone or unreachable: the request never got an answer, so the ingress may retry
    it on another replica (raised inside the replica; Ray re-raises it, type kept, at the ingress)."""


class OpKind(enum.Enum):
    """A runtime adapter change made through the ingress."""

    LOAD = "load"
    UNLOAD = "unload"


@dataclass(frozen=True)
class AdapterOp:
    """One accepted POST /v1/load_lora_adapter or /v1/unload_lora_adapter, replayed on every replica."""

    kind: OpKind
    name: str
    path: str | None = None  # LOAD only: the directory as the client gave it


@dataclass(frozen=True)
class Forwarded:
    """An HTTP request as the ingress received it, plus the runtime adapter log the replica must have applied first
    (the whole log: a replica started later replays it from the beginning)."""

    method: str
    path: str  # with the query string
    headers: tuple[tuple[str, str], ...]
    body: bytes
    ops: tuple[AdapterOp, ...] = ()


@dataclass(frozen=True)
class Head:
    """Status line and headers of an engine's answer (the first item of a streamed answer)."""

    status: int
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Answer:
    """A whole (non-streamed) answer of a replica's engine."""

    head: Head
    body: bytes


@dataclass(frozen=True)
class ReplicaReport:
    """What a replica pushes to the board every interval: health and its engine's Prometheus text."""

    replica: str
    healthy: bool
    metrics: str
    sent_at: float  # time.time() on the replica
    detail: str = ""  # why it is unhealthy
    engine_pid: int | None = None  # the engine's HTTP process (rank 0)


@dataclass(frozen=True)
class ReplicaSpec:
    """How every replica starts its engine: the single server's settings and the launch's environment."""

    server_settings: dict  # megatron_bdlora.serve's --config keys (absolute paths), without host / port / api_key
    tp: int
    api_key: str | None
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 600.0
    report_interval_s: float = 0.5
