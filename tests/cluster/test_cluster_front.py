"""The ingress's logic (ClusterFront) over fake engine handles: routing by adapter, retries within the window, the
stream that fails mid-way, the runtime adapter log; and the replica-labelled /metrics."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from megatron_bdlora.cluster.ingress import ClusterFront, IngressSettings, Unanswered
from megatron_bdlora.cluster.messages import Answer, EngineUnavailable, Forwarded, Head, OpKind, ReplicaReport
from megatron_bdlora.cluster.metrics import cluster_families, exposition, labelled_families

OK_HEAD = Head(200, (("content-type", "application/json"),))


class FakeCall:
    """handle.<method>.remote(...): answers from a script, one per call (an exception is raised instead)."""

    def __init__(self, engines: "FakeEngines", name: str) -> None:
        self.engines, self.name = engines, name

    def remote(self, fwd: Forwarded):
        self.engines.calls.append((self.name, self.engines.model_id, fwd))
        outcome = self.engines.script.pop(0)
        if self.name == "stream":
            return FakeStream(outcome)

        async def answer():
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        return answer()


class FakeStream:
    """A DeploymentResponseGenerator: yields the items, raising any exception among them."""

    def __init__(self, items: list) -> None:
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngines:
    """The engines' DeploymentHandle: .options(multiplexed_model_id=..., stream=...) and method calls."""

    def __init__(self, script: list, calls: list | None = None, model_id: str | None = None) -> None:
        self.script, self.calls, self.model_id = script, [] if calls is None else calls, model_id

    def options(self, multiplexed_model_id: str | None = None, stream: bool = False) -> "FakeEngines":
        view = FakeEngines(self.script, self.calls, multiplexed_model_id or self.model_id)
        return view

    def __getattr__(self, name: str) -> FakeCall:
        return FakeCall(self, name)


def front(script: list, route_by_adapter: bool = True, window_s: float = 5.0) -> ClusterFront:
    settings = IngressSettings(adapters=("a0", "a1"), route_by_adapter=route_by_adapter, retry_window_s=window_s,
                               api_key=None, max_request_bytes=1 << 20)
    return ClusterFront(FakeEngines(script), None, settings)


def completion(model: str, stream: bool = False) -> Forwarded:
    body = json.dumps({"model": model, "prompt": "hi", "stream": stream}).encode()
    return Forwarded("POST", "/v1/completions", (("content-type", "application/json"),), body)


def run(coro):
    return asyncio.run(coro)


def test_adapter_requests_carry_the_adapter_as_multiplexed_id_and_others_none():
    f = front([Answer(OK_HEAD, b"{}")] * 4)
    for model in ("a0", "a1", "base-model", "unknown"):
        run(f.forward(completion(model)))
    assert [model_id for _, model_id, _ in f.engines.calls] == ["a0", "a1", None, None]
    g = front([Answer(OK_HEAD, b"{}")], route_by_adapter=False)
    run(g.forward(completion("a0")))
    assert g.engines.calls[0][1] is None, "default routing must not use multiplexing"


def test_request_is_retried_after_a_replica_gives_no_answer_and_the_answer_passes_through():
    f = front([EngineUnavailable("engine gone"), EngineUnavailable("engine gone"),
               Answer(Head(400, (("content-type", "application/json"),)), b'{"error": 1}')])
    response = run(f.forward(completion("a0")))
    assert (response.status_code, response.body) == (400, b'{"error": 1}')  # an engine's error is an answer
    assert len(f.engines.calls) == 3 and f.retries == 2


def test_no_answer_within_the_retry_window_is_unanswered():
    f = front([EngineUnavailable("engine gone")] * 100, window_s=0.5)
    with pytest.raises(Unanswered, match="retry_window_s"):
        run(f.forward(completion("a0")))
    assert f.unanswered == 1 and 2 <= len(f.engines.calls) < 10  # backoff, not a busy loop


def _drain(response) -> bytes:
    async def read():
        return b"".join([chunk async for chunk in response.body_iterator])

    return run(read())


def test_stream_is_retried_before_its_first_bytes_and_ends_with_an_error_event_after_them():
    sse_head = Head(200, (("content-type", "text/event-stream"),))
    f = front([[EngineUnavailable("gone before the head")],
               [sse_head, b"data: 1\n\n", b"data: 2\n\n", EngineUnavailable("gone mid-stream")]])
    response = run(f.stream(f.engines, completion("a0", stream=True), "POST /v1/completions"))
    body = _drain(response).decode()
    assert response.status_code == 200 and f.retries == 1
    events = [e for e in body.split("\n\n") if e]
    assert events[:2] == ["data: 1", "data: 2"]
    assert json.loads(events[2].removeprefix("data: "))["error"]["code"] == 503
    assert events[3] == "data: [DONE]"


def test_accepted_adapter_changes_join_the_log_that_later_requests_carry():
    def change(path: str, **fields: str) -> Forwarded:
        return Forwarded("POST", path, (), json.dumps(fields).encode())

    load = change("/v1/load_lora_adapter", lora_name="new", lora_path="/x")
    refused = change("/v1/load_lora_adapter", lora_name="bad", lora_path="/y")
    unload = change("/v1/unload_lora_adapter", lora_name="a0")
    f = front([Answer(OK_HEAD, b"ok"), Answer(Head(404, ()), b"disabled"), Answer(OK_HEAD, b"ok"),
               Answer(OK_HEAD, b"{}"), Answer(OK_HEAD, b"{}")])
    run(f.change_adapters(load, OpKind.LOAD))
    run(f.change_adapters(refused, OpKind.LOAD))
    run(f.change_adapters(unload, OpKind.UNLOAD))
    assert [(op.kind, op.name, op.path) for op in f.ops] == [(OpKind.LOAD, "new", "/x"), (OpKind.UNLOAD, "a0", None)]
    assert [len(fwd.ops) for _, _, fwd in f.engines.calls] == [0, 1, 1]  # each change sees the log before it
    run(f.forward(completion("new")))
    run(f.forward(completion("a0")))
    assert f.engines.calls[-2][1:] == ("new", f.engines.calls[-2][2]) and len(f.engines.calls[-2][2].ops) == 2
    assert f.engines.calls[-1][1] is None, "an unloaded adapter no longer routes by affinity"


def engine_metrics(loads: int, refused: int) -> str:
    """A replica's /metrics text as the single server writes it (prometheus_client's exposition)."""
    rejected = CounterMetricFamily("bdlora_requests_rejected", "Refused", labels=["reason"])
    rejected.add_metric(["queue_full"], refused)
    return exposition([CounterMetricFamily("bdlora_adapter_loads", "Adapter loads", value=loads), rejected]).decode()


def test_metrics_carry_every_replica_with_a_replica_label_once_per_family():
    reports = [ReplicaReport("r1", True, engine_metrics(3, 1), 0.0),
               ReplicaReport("r2", False, engine_metrics(5, 0), 0.0)]
    out = exposition([*labelled_families(reports), *cluster_families(reports, 2, 1, {"unauthorized": 4})]).decode()
    assert out.count("# TYPE bdlora_adapter_loads_total counter") == 1
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(out) for s in fam.samples}
    assert samples[("bdlora_adapter_loads_total", (("replica", "r1"),))] == 3
    assert samples[("bdlora_adapter_loads_total", (("replica", "r2"),))] == 5
    assert samples[("bdlora_requests_rejected_total", (("reason", "queue_full"), ("replica", "r1")))] == 1
    assert samples[("bdlora_cluster_replicas", (("state", "healthy"),))] == 1
    assert samples[("bdlora_cluster_replicas", (("state", "unhealthy"),))] == 1
    assert samples[("bdlora_cluster_retries_total", ())] == 2
    assert samples[("bdlora_cluster_requests_rejected_total", (("reason", "unauthorized"),))] == 4
