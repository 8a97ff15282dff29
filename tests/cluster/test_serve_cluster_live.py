"""`python -m megatron_bdlora.serve_cluster` with the shipped SmolLM2 config (2 replicas x TP=1 on a local Ray with
2 CPUs), 4 PEFT adapters and --max-loras 2, driven by the official openai client.

The reference is a single `megatron_bdlora.serve` started with the same settings (the replica's own config) and
adapters: every cluster answer, streamed or not, must be its greedy text. Then a replica's engine is killed with
SIGKILL during a load: non-streamed requests all complete with the right text, the stream it was serving ends
with an error event, and Serve brings the replica count back.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import yaml
from cluster_helpers import SMOLLM2_CLUSTER, ClusterServer, smollm2_peft_adapters
from live_server import LiveServer
from prometheus_client.parser import text_string_to_metric_families

from megatron_bdlora.cluster.options import load_launch, replica_settings

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

ADAPTERS = ["a0", "a1", "a2", "a3"]
PROMPTS = ["The capital of France is", "Write one sentence about the sea.", "List three colours:"]
MAX_TOKENS = 10
GREEDY = dict(temperature=0.0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})


def ask(client, model: str, prompt: str, chat: bool, stream: bool) -> str:
    """One request's text, joined from the stream when streamed."""
    if chat:
        messages = [{"role": "user", "content": prompt}]
        out = client.chat.completions.create(model=model, messages=messages, stream=stream, **GREEDY)
        if not stream:
            return out.choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in out if c.choices)
    out = client.completions.create(model=model, prompt=prompt, stream=stream, **GREEDY)
    return "".join(c.choices[0].text for c in out if c.choices) if stream else out.choices[0].text


def per_replica(server: ClusterServer, family: str) -> dict[str, float]:
    """A counter or gauge of the engines, by replica, from the ingress's /metrics."""
    text = server.http.get("/metrics").text
    return {s.labels["replica"]: s.value for f in text_string_to_metric_families(text) if f.name == family
            for s in f.samples if "replica" in s.labels}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    adapters = smollm2_peft_adapters(root, ADAPTERS)
    flags = [arg for name, path in adapters.items() for arg in ("--adapter", f"{name}={path}")] + ["--max-loras", "2"]
    # the reference: one single server with exactly a replica's settings
    settings = replica_settings(load_launch(["--config", str(SMOLLM2_CLUSTER), *flags]).server, 1)
    (root / "single.yaml").write_text(yaml.safe_dump(settings))
    single = LiveServer(1, ["--config", str(root / "single.yaml")])
    try:
        base = single.client.models.list().data[0].id
        jobs = [(model, p, chat) for model in [base, *ADAPTERS] for p in PROMPTS for chat in (False, True)]
        with ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(lambda j: ask(single.client, *j, stream=False), jobs))
    finally:
        assert single.stop() == 0, single.log()
    want = dict(zip(jobs, texts))
    assert len({want[(a, p, False)] for a in [base, *ADAPTERS] for p in PROMPTS[:1]}) == 5, \
        "adapters too weak to test routing: some answer like the base model"
    server = ClusterServer(["--config", str(SMOLLM2_CLUSTER), *flags, "--enable-lora-runtime-updating"])
    server.adapter_dirs = adapters
    yield server, base, want
    assert server.stop() == 0, server.log()


def test_cluster_answers_equal_the_single_server_and_adapters_stay_on_their_replica(cluster):
    server, base, want = cluster
    assert [m.id for m in server.client.models.list().data] == [base, *ADAPTERS]
    assert len(server.wait_for(lambda rs: len(rs) == 2 and all(r["healthy"] for r in rs), 30, "2 replicas")) == 2
    jobs = [(model, p, chat, stream) for (model, p, chat) in want for stream in (False, True)]  # 60 requests
    assert len(jobs) == 60
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: ask(server.client, *j), jobs))
    for (model, prompt, chat, stream), text in zip(jobs, got):
        assert text == want[(model, prompt, chat)], f"{model} chat={chat} stream={stream}: {text!r}"
    time.sleep(2)  # replicas report every 0.5 s
    loads = per_replica(server, "bdlora_adapter_loads")
    assert len(loads) == 2, loads
    # each adapter loaded about once over the cluster (4 adapters, 2 slots per replica): routing kept them apart
    assert sum(loads.values()) <= 1.5 * len(ADAPTERS), loads
    assert sum(per_replica(server, "bdlora_adapter_evictions").values()) <= 0.5 * len(ADAPTERS)


def _stream_until_killed(server: ClusterServer, first_token, body: dict) -> list[str]:
    """The raw events of one streamed completion; sets first_token once a token arrived."""
    events = []
    with server.http.stream("POST", "/v1/completions", json=body, timeout=300) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                first_token.set()
    return events


def test_engine_killed_during_a_load_non_streamed_requests_complete_and_the_replica_comes_back(cluster):
    import threading

    server, base, want = cluster
    before = server.wait_for(lambda rs: len(rs) == 2 and all(r["healthy"] for r in rs), 60, "2 healthy replicas")
    first_token = threading.Event()
    long_stream = {"model": base, "prompt": "Tell me a long story.", "max_tokens": 400, "stream": True,
                   "temperature": 0.0, "ignore_eos": True}
    with ThreadPoolExecutor(9) as pool:
        stream = pool.submit(_stream_until_killed, server, first_token, long_stream)
        assert first_token.wait(120), server.log()
        running = server.wait_for(lambda rs: any(v >= 1 for v in per_replica(server, "bdlora_running").values()), 30,
                                  "the stream running on a replica")
        victim = max(per_replica(server, "bdlora_running").items(), key=lambda kv: kv[1])[0]
        pid = next(r["engine_pid"] for r in running if r["replica"] == victim)
        jobs = [(model, p, chat) for (model, p, chat) in want if not chat][:8] + list(want)[-4:]
        answers = [pool.submit(ask, server.client, *job, False) for job in jobs]
        time.sleep(1.0)  # the requests are in the engines
        os.kill(pid, signal.SIGKILL)
        for job, answer in zip(jobs, answers):
            assert answer.result(timeout=240) == want[job], f"{job}: wrong text after the failover"
        events = stream.result(timeout=240)
    errors = [json.loads(e)["error"] for e in events[:-1] if e.startswith("{") and "error" in json.loads(e)]
    assert errors and errors[0]["code"] == 503 and events[-1] == "[DONE]", events[-3:]
    after = server.wait_for(lambda rs: len(rs) == 2 and all(r["healthy"] for r in rs) and victim not in
                            {r["replica"] for r in rs}, 180, "the killed replica replaced")
    assert {r["replica"] for r in before} - {victim} <= {r["replica"] for r in after}
    text = server.http.get("/metrics").text
    assert "bdlora_cluster_unanswered_total 0.0" in text, "a request ran out of its retry window"
    assert ask(server.client, "a1", PROMPTS[0], False, False) == want[("a1", PROMPTS[0], False)]


def test_runtime_load_and_unload_through_the_ingress_reach_every_replica(cluster):
    server, base, want = cluster
    load = {"lora_name": "rt", "lora_path": server.adapter_dirs["a3"]}  # a3's files under a new name
    assert server.http.post("/v1/load_lora_adapter", json=load).status_code == 200
    again = server.http.post("/v1/load_lora_adapter", json=load)
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert server.http.post("/v1/unload_lora_adapter", json={"lora_name": "a3"}).status_code == 200
    for _ in range(8):  # any replica may answer each request: all must have replayed both changes
        assert [m.id for m in server.client.models.list().data] == [base, "a0", "a1", "a2", "rt"]
        with pytest.raises(openai.NotFoundError):
            server.client.completions.create(model="a3", prompt=PROMPTS[0], max_tokens=2)
    assert ask(server.client, "rt", PROMPTS[0], False, False) == want[("a3", PROMPTS[0], False)]
    assert ask(server.client, "rt", PROMPTS[1], True, True) == want[("a3", PROMPTS[1], True)]
