"""What keeps an exposed server safe (inference/http_guard.py, policy.py, frontend.py), against the fake engine:
the API key, runtime adapter loading and its roots, body / stop / queue limits, tokenising off the event loop,
liveness of a stuck engine, and the metrics of refusals.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pytest
from fake_server import BASE, CANNED, FakeLoop, Served, adapter_dir, error_json, serving, still_serving
from prometheus_client.parser import text_string_to_metric_families

from megatron_bdlora.inference.policy import ServerPolicy
from megatron_bdlora.inference.requests import AdapterConflictError

KEY = "s3cret-key"


def _serve(root: Path, policy: ServerPolicy, loop: FakeLoop | None = None):
    """fake_server.serving with the openai client holding KEY."""
    yield from serving(root, policy, loop, key=KEY)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    yield from _serve(tmp_path_factory.mktemp("keyed"), ServerPolicy(api_key=KEY))


@pytest.fixture(scope="module")
def rooted(tmp_path_factory):
    """Runtime loading on, limited to <tmp>/root; small limits for the overload and size tests."""
    base = tmp_path_factory.mktemp("rooted")
    (base / "root").mkdir()
    policy = ServerPolicy(enable_lora_runtime_updating=True, lora_roots=(str(base / "root"),), max_queued_requests=8,
                          max_request_bytes=2_000_000, engine_step_timeout=0.5)
    yield from _serve(base, policy)


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    yield from _serve(tmp_path_factory.mktemp("default"), ServerPolicy())


def _metric(s: Served, name: str) -> list:
    families = {f.name: f for f in text_string_to_metric_families(s.http.get("/metrics").text)}
    return families[name].samples


# --------------------------------------------------------------------------------------------------------------
# the API key


V1_ROUTES = [("POST", "/v1/completions", {"model": BASE, "prompt": "x"}),
             ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
             ("GET", "/v1/models", None), ("GET", f"/v1/models/{BASE}", None),
             ("POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/"}),
             ("POST", "/v1/unload_lora_adapter", {"lora_name": "a"})]


@pytest.mark.parametrize("method,path,body", V1_ROUTES)
def test_every_v1_route_needs_the_key(keyed, method, path, body):
    for headers in ({}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        res = keyed.http.request(method, path, json=body, headers=headers)
        error_json(res, 401, None, "API key")
        assert res.headers["www-authenticate"] == "Bearer"
    res = keyed.http.request(method, path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert res.status_code != 401, res.text  # past the key (the default policy refuses runtime loading: 404)


def test_openai_client_with_the_key_works_and_without_it_raises_authentication_error(keyed):
    out = keyed.client.completions.create(model="poet", prompt="x", max_tokens=64)
    assert out.choices[0].text == CANNED["poet"]
    for key in ("wrong", ""):
        client = keyed.client.with_options(api_key=key or "-")
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model=BASE, prompt="x")
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    with httpx2.Client(base_url=keyed.url, trust_env=False) as bare:  # no Authorization header at all
        assert bare.get("/v1/models").status_code == 401
        assert bare.get("/health").status_code == 200
        assert bare.get("/metrics").status_code == 200
    refused = {s.labels["reason"]: s.value for s in _metric(keyed, "bdlora_requests_rejected")}
    assert refused["unauthorized"] >= 5


# --------------------------------------------------------------------------------------------------------------
# runtime adapter loading


def test_runtime_loading_is_refused_by_default_before_reading_the_body(default, tmp_path):
    path = adapter_dir(tmp_path, "pirate")
    for route, body in (("/v1/load_lora_adapter", {"lora_name": "pirate", "lora_path": str(path)}),
                        ("/v1/unload_lora_adapter", {"lora_name": "poet"})):
        error_json(default.http.post(route, json=body), 404, None, "--enable-lora-runtime-updating")
        error_json(default.http.post(route, content=b"{not json"), 404, None, "disabled")
    assert [m.id for m in default.client.models.list().data] == [BASE, "poet"]


def test_lora_root_allows_paths_inside_and_refuses_every_way_out_alike(rooted, tmp_path):
    root = rooted.adapters_root / "root"
    inside = adapter_dir(root, "inside")
    outside = adapter_dir(rooted.adapters_root, "outside")
    (root / "link").symlink_to(outside, target_is_directory=True)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    messages = set()
    for path in (root / ".." / "outside", str(outside), root / "link", sneaky, "/etc", root / ".." / "nothing-here"):
        res = rooted.http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(path)})
        messages.add(error_json(res, 400, "lora_path")["message"])
    assert len(messages) == 1 and "--lora-root" in messages.pop()  # says nothing of whether the path exists
    res = rooted.http.post("/v1/load_lora_adapter", json={"lora_name": "inside", "lora_path": str(inside)})
    assert res.status_code == 200, res.text
    assert rooted.loop.adapters["inside"] == str(inside.resolve())
    assert rooted.client.completions.create(model="inside", prompt="x", max_tokens=64).choices[0].text == (
        "inside says hello.")
    assert rooted.http.post("/v1/unload_lora_adapter", json={"lora_name": "inside"}).status_code == 200


def test_a_concurrent_load_or_unload_of_one_name_is_a_409(rooted, monkeypatch):
    def busy(name, *args):
        raise AdapterConflictError(name, "load")

    root = rooted.adapters_root / "root"
    monkeypatch.setattr(rooted.loop, "load_adapter", busy)
    monkeypatch.setattr(rooted.loop, "unload_adapter", busy)
    res = rooted.http.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapter_dir(root, "b"))})
    error_json(res, 409, "lora_name", "'b'")
    error_json(rooted.http.post("/v1/unload_lora_adapter", json={"lora_name": "poet"}), 409, "lora_name", "'poet'")
    monkeypatch.undo()
    still_serving(rooted)


# --------------------------------------------------------------------------------------------------------------
# sizes, stops, ranges


def test_body_over_the_limit_is_413_with_or_without_content_length(rooted):
    big = json.dumps({"model": BASE, "prompt": "x" * 3_000_000}).encode()
    error_json(rooted.http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}), 413,
               None, "2000000 bytes")

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    res = rooted.http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in res.request.headers
    error_json(res, 413, None, "2000000 bytes")
    still_serving(rooted)


@pytest.mark.parametrize("extra,param,words", [
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", ("5 strings", "at most 4")),
    ({"stop": "s" * 257}, "stop", ("257 characters", "at most 256")),
    ({"stop_token_ids": list(range(3, 68))}, "stop_token_ids", ("65 ids", "at most 64")),
    ({"temperature": 2.0001}, "temperature", ("[0, 2]",)),
    ({"temperature": -1e-40}, "temperature", ("[0, 2]",)),
    ({"seed": 2**63}, "seed", ()),
    ({"seed": -(2**63) - 1}, "seed", ()),
])
def test_limits_and_ranges_are_400_naming_the_field(rooted, extra, param, words):
    res = rooted.http.post("/v1/completions", json={"model": BASE, "prompt": "x", **extra})
    error_json(res, 400, param, *words)


def test_values_at_the_bounds_are_served_and_tiny_temperatures_raised_to_the_floor(rooted):
    loop = rooted.loop
    for extra in ({"stop": ["a", "b", "c", "d"]}, {"stop": "s" * 256}, {"stop_token_ids": list(range(3, 67))},
                  {"temperature": 2.0}, {"temperature": 0.0}, {"seed": 2**63 - 1}, {"seed": -(2**63)}):
        res = rooted.http.post("/v1/completions", json={"model": BASE, "prompt": "x", **extra})
        assert res.status_code == 200, (extra, res.text)
    for tiny, expected in ((1e-40, 0.01), (0.0099, 0.01), (0.01, 0.01), (0.5, 0.5)):
        rooted.http.post("/v1/completions", json={"model": BASE, "prompt": "x", "temperature": tiny})
        assert loop.submitted[-1][2].temperature == expected
    res = rooted.http.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                           headers={"Content-Type": "application/json"})
    error_json(res, 400, "temperature")


# --------------------------------------------------------------------------------------------------------------
# overload


def test_overload_is_200s_and_429s_with_retry_after_and_the_server_serves_afterwards(rooted):
    rooted.loop.step_s = 0.05  # 64 tokens at 2 per step: each request takes ~1.6 s, so 40 at once overflow 8
    statuses, answers = [], []

    def one(i: int) -> None:
        res = rooted.http.post("/v1/completions", json={"model": "poet", "prompt": f"q{i}", "max_tokens": 64})
        statuses.append(res.status_code)
        if res.status_code == 200:
            answers.append(res.json()["choices"][0]["text"])
        else:
            error_json(res, 429, None, "--max-queued-requests")
            assert res.headers["retry-after"] == "1"

    try:
        with ThreadPoolExecutor(40) as pool:
            list(pool.map(one, range(40)))
    finally:
        rooted.loop.step_s = 0.002
    assert set(statuses) <= {200, 429} and len(statuses) == 40
    assert 8 <= statuses.count(200) < 40 and answers == [CANNED["poet"]] * statuses.count(200)
    refused = {s.labels["reason"]: s.value for s in _metric(rooted, "bdlora_requests_rejected")}
    assert refused["queue_full"] >= statuses.count(429)
    assert _metric(rooted, "bdlora_requests_in_flight")[0].value == 0
    still_serving(rooted)


def test_tokenising_a_long_prompt_does_not_stall_health(rooted, monkeypatch):
    tokenizer = rooted.loop.tokenizer
    encode = tokenizer.encode

    def slow_encode(text: str) -> list[int]:  # as a 200k-character prompt takes on a real tokenizer, but longer
        if len(text) > 100_000:
            time.sleep(2.0)
        return encode(text)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    result = {}
    sender = threading.Thread(target=lambda: result.setdefault("res", rooted.http.post(
        "/v1/completions", json={"model": BASE, "prompt": "y" * 200_000})))
    sender.start()
    time.sleep(0.2)
    delays = []
    while sender.is_alive() and len(delays) < 100:  # bounded: ~2 s of probes
        start = time.monotonic()
        assert rooted.http.get("/health").status_code == 200
        delays.append(time.monotonic() - start)
        time.sleep(0.05)
    sender.join(timeout=20)
    assert len(delays) >= 5 and max(delays) < 1.0, delays
    error_json(result["res"], 400, "prompt", "maximum context length")


# --------------------------------------------------------------------------------------------------------------
# liveness and metrics


def test_health_is_503_while_no_step_finishes_and_recovers(rooted):
    rooted.loop.stalled = True
    try:
        time.sleep(1.0)  # engine_step_timeout is 0.5 s here
        error_json(rooted.http.get("/health"), 503, None, "has not finished a step", "--engine-step-timeout")
    finally:
        rooted.loop.stalled = False
    time.sleep(0.1)
    assert rooted.http.get("/health").status_code == 200


def test_metrics_have_vllm_lora_requests_info_and_refusals_by_reason(rooted):
    started = threading.Event()
    sender = threading.Thread(target=lambda: (started.set(), rooted.http.post(
        "/v1/completions", json={"model": "poet", "prompt": "x", "max_tokens": 64, "ignore_eos": True})))
    rooted.loop.step_s = 0.05
    try:
        sender.start()
        started.wait(5)
        time.sleep(0.3)
        (info,) = _metric(rooted, "vllm:lora_requests_info")
        assert info.labels == {"max_lora": "2", "running_lora_adapters": "poet", "waiting_lora_adapters": ""}
        assert abs(info.value - time.time()) < 60
    finally:
        sender.join(timeout=20)
        rooted.loop.step_s = 0.002
    rooted.http.post("/v1/completions", json={"model": "nobody", "prompt": "x"})
    rooted.http.post("/v1/completions", json={"model": BASE, "prompt": "x", "top_p": 7})
    refused = {s.labels["reason"]: s.value for s in _metric(rooted, "bdlora_requests_rejected")}
    assert refused["not_found"] >= 1 and refused["invalid_request"] >= 1
    assert set(refused) >= {"unauthorized", "body_too_large", "queue_full", "conflict"}


def test_the_api_key_is_the_flag_else_the_environment(monkeypatch):
    from megatron_bdlora.inference.policy import API_KEY_ENV, api_key_from

    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key_from(None) == "from-env" and api_key_from("flag") == "flag" and api_key_from("") is None
    monkeypatch.delenv(API_KEY_ENV)
    assert api_key_from(None) is None
