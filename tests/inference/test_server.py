"""The OpenAI-compatible server (inference/routes.py, frontend.py, protocol.py, errors.py) against a fake
ServingLoop (fake_server.py); serve.py's CLI and process flow; launch/serve.sh and launch/slurm/serve.sbatch with
stand-ins for python, srun and scontrol. Requests go through the official openai client where it applies, raw bodies
through httpx2.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx2
import openai
import pytest
from fake_server import BASE, CANNED, FakeLoop, Served, adapter_dir, error_json, start_http, still_serving
from prometheus_client.parser import text_string_to_metric_families

from megatron_bdlora.inference.policy import ServerPolicy
from megatron_bdlora.inference.requests import GenerationParams

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from megatron_bdlora.inference.routes import build_app

    root = tmp_path_factory.mktemp("adapters")
    poet = adapter_dir(root, "poet")
    loop = FakeLoop({"poet": str(poet)})
    loop.start()
    app = build_app(loop, adapter_paths={"poet": str(poet)}, policy=ServerPolicy(enable_lora_runtime_updating=True))
    server, thread = start_http(app)
    http = httpx2.Client(base_url=server.url, timeout=10, trust_env=False)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=10,
                           http_client=httpx2.Client(trust_env=False))
    yield Served(loop, server.url, client, http, root)
    server.should_exit = True
    thread.join(timeout=10)
    loop.shutdown(drain=False)


@pytest.fixture
def fresh(served):
    """Reset what tests change on the shared fake loop."""
    served.loop.alive, served.loop.step_s = True, 0.002
    served.loop.submitted.clear()
    served.loop.cancelled.clear()
    yield served
    served.loop.alive, served.loop.step_s = True, 0.002



# --------------------------------------------------------------------------------------------------------------
# completions and chat


@pytest.mark.parametrize("model", [BASE, "poet"])
def test_completion_returns_the_text_finish_reason_and_usage(fresh, model):
    out = fresh.client.completions.create(model=model, prompt="Hello", max_tokens=64)
    expected = CANNED[None if model == BASE else model]
    assert out.object == "text_completion" and out.model == model and out.id.startswith("cmpl-")
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        5,
        len(expected),
        5 + len(expected),
    )
    prompt_ids, adapter, params = fresh.loop.submitted[-1]
    assert prompt_ids == fresh.loop.tokenizer.encode("Hello") and adapter == (None if model == BASE else model)
    assert params.max_tokens == 64


def test_completion_defaults_to_16_tokens_and_says_length(fresh):
    out = fresh.client.completions.create(model=BASE, prompt="Hello")
    assert out.choices[0].text == CANNED[None][:16] and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 16


def test_completion_takes_token_ids_and_a_one_element_list(fresh):
    ids = fresh.loop.tokenizer.encode("abc")
    assert fresh.client.completions.create(model=BASE, prompt=ids, max_tokens=4).usage.prompt_tokens == 3
    assert fresh.loop.submitted[-1][0] == ids
    fresh.client.completions.create(model=BASE, prompt=["abcd"], max_tokens=4)
    assert fresh.loop.submitted[-1][0] == fresh.loop.tokenizer.encode("abcd")


@pytest.mark.parametrize("model", [BASE, "poet"])
def test_chat_applies_the_chat_template_and_defaults_max_tokens_to_the_context_left(fresh, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    out = fresh.client.chat.completions.create(model=model, messages=messages)
    expected = CANNED[None if model == BASE else model]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "stop"
    prompt_ids, _, params = fresh.loop.submitted[-1]
    assert prompt_ids == fresh.loop.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert params.max_tokens == FakeLoop.max_model_len - len(prompt_ids)
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == len(expected)


def test_chat_accepts_text_content_parts_and_max_completion_tokens(fresh):
    out = fresh.client.chat.completions.create(
        model=BASE, max_completion_tokens=5,
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    assert fresh.loop.submitted[-1][0] == fresh.loop.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a\nb"}], add_generation_prompt=True)


def test_sampling_fields_reach_the_engine(fresh):
    fresh.client.completions.create(
        model=BASE,
        prompt="x",
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        seed=3,
        stop=["zz", "yy"],
        extra_body={"top_k": 5, "stop_token_ids": [9], "ignore_eos": True},
    )
    assert fresh.loop.submitted[-1][2] == GenerationParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, seed=3,
                                                           stop=("zz", "yy"), stop_token_ids=(9,), ignore_eos=True)


def test_stop_string_and_stop_token_end_with_stop(fresh):
    out = fresh.client.completions.create(model=BASE, prompt="x", max_tokens=64, stop="France")
    assert out.choices[0].text == "The capital of " and out.choices[0].finish_reason == "stop"
    comma = fresh.loop.tokenizer.encode(",")[0]
    out = fresh.client.completions.create(
        model="poet", prompt="x", max_tokens=64, extra_body={"stop_token_ids": [comma]}
    )
    assert out.choices[0].text == "Of Man's first disobedience" and out.choices[0].finish_reason == "stop"
    out = fresh.client.completions.create(model=BASE, prompt="x", max_tokens=50, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 50


# --------------------------------------------------------------------------------------------------------------
# streaming


@pytest.mark.parametrize("model", [BASE, "poet"])
def test_streamed_completion_concatenates_to_the_whole_text(fresh, model):
    whole = fresh.client.completions.create(model=model, prompt="Hi", max_tokens=20)
    chunks = list(fresh.client.completions.create(model=model, prompt="Hi", max_tokens=20, stream=True,
                                                  stream_options={"include_usage": True}))
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason == "length" and set(reasons[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1]) and {c.id for c in chunks} == {chunks[0].id}


@pytest.mark.parametrize("model", [BASE, "poet"])
def test_streamed_chat_concatenates_to_the_whole_message(fresh, model):
    messages = [{"role": "user", "content": "Hi"}]
    whole = fresh.client.chat.completions.create(model=model, messages=messages)
    chunks = list(fresh.client.chat.completions.create(model=model, messages=messages, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop" and all(
        c.choices[0].finish_reason is None for c in chunks[:-1]
    )
    assert all(c.object == "chat.completion.chunk" and c.model == model for c in chunks)
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_stream_is_server_sent_events_ending_in_done(fresh):
    with fresh.http.stream(
        "POST", "/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 6, "stream": True}
    ) as res:
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        raw = "".join(res.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(p["choices"][0]["text"] for p in payloads) == CANNED[None][:6]


def test_client_disconnect_cancels_the_request_streamed_or_not(fresh):
    fresh.loop.step_s = 0.05  # 2 tokens per 50 ms: 120 tokens take 3 s
    body = {"model": BASE, "prompt": "Hi", "max_tokens": 120, "ignore_eos": True, "stream": True}
    with httpx2.Client(base_url=fresh.url, timeout=10, trust_env=False) as http:
        with http.stream("POST", "/v1/completions", json=body) as res:
            first = next(res.iter_lines())
            assert first.startswith("data: {")
    for _ in range(100):  # bounded: 5 s
        if fresh.loop.cancelled:
            break
        time.sleep(0.05)
    assert len(fresh.loop.cancelled) == 1
    assert fresh.loop.metrics()["running"] == 0
    with httpx2.Client(base_url=fresh.url, timeout=0.5, trust_env=False) as http:  # a non-streamed one, given up on
        with pytest.raises(httpx2.ReadTimeout):
            http.post("/v1/completions", json={**body, "stream": False})
    for _ in range(100):  # bounded: 5 s
        if len(fresh.loop.cancelled) == 2:
            break
        time.sleep(0.05)
    assert len(fresh.loop.cancelled) == 2 and fresh.loop.metrics()["running"] == 0
    still_serving(fresh)


def test_engine_error_event_is_a_500_or_an_sse_error_and_the_server_keeps_serving(fresh):
    with pytest.raises(openai.InternalServerError) as err:
        fresh.client.completions.create(model=BASE, prompt="FAIL", max_tokens=5)
    assert "injected failure" in err.value.body["message"]
    with pytest.raises(openai.APIError, match="injected failure"):
        list(fresh.client.completions.create(model=BASE, prompt="FAIL", max_tokens=5, stream=True))
    still_serving(fresh)


def test_dead_engine_answers_503_instead_of_hanging(fresh):
    fresh.loop.alive = False
    start = time.monotonic()
    error_json(fresh.http.post("/v1/completions", json={"model": BASE, "prompt": "x"}), 503, None, "engine stopped")
    assert time.monotonic() - start < 5
    error_json(fresh.http.get("/health"), 503, None)
    with fresh.http.stream("POST", "/v1/completions", json={"model": BASE, "prompt": "x", "stream": True}) as res:
        raw = "".join(res.iter_text())
    assert '"code":503' in raw and raw.endswith("data: [DONE]\n\n")
    fresh.loop.alive = True
    assert fresh.http.get("/health").status_code == 200
    still_serving(fresh)


# --------------------------------------------------------------------------------------------------------------
# errors


def test_unknown_model_is_404_not_found(fresh):
    with pytest.raises(openai.NotFoundError) as err:
        fresh.client.completions.create(model="nope", prompt="x")
    assert err.value.status_code == 404
    assert err.value.body == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    with pytest.raises(openai.NotFoundError):
        fresh.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], stream=True)
    error_json(fresh.http.get("/v1/models/nope"), 404, "model")
    error_json(fresh.http.get("/v1/no/such/route"), 404, None)
    still_serving(fresh)


@pytest.mark.parametrize(("content", "headers", "words"), [
    (b'{"model": "fake-base", "prompt": ', {"content-type": "application/json"}, ["malformed JSON"]),
    (b"[1, 2]", {"content-type": "application/json"}, ["JSON object"]),
    (b"prompt=hi", {"content-type": "application/x-www-form-urlencoded"}, ["JSON object"]),
    (b"", {"content-type": "application/json"}, ["body is missing"]),
])
def test_malformed_body_is_400(fresh, content, headers, words):
    error_json(fresh.http.post("/v1/completions", content=content, headers=headers), 400, None, *words)
    still_serving(fresh)


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/v1/completions", {"model": BASE}, "prompt", ["'prompt' is a required field"]),
        ("/v1/chat/completions", {"model": BASE}, "messages", ["required"]),
        (
            "/v1/chat/completions",
            {"model": BASE, "messages": [{"content": "x"}]},
            "messages",
            ["messages.0.role", "required"],
        ),
        ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": "5"}, "max_tokens", ["integer", "'5'"]),
        ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 5.5}, "max_tokens", ["integer"]),
        ("/v1/completions", {"model": BASE, "prompt": "x", "temperature": "hot"}, "temperature", ["number"]),
        ("/v1/completions", {"model": BASE, "prompt": "x", "stream": "yes"}, "stream", ["boolean"]),
        ("/v1/completions", {"model": 7, "prompt": "x"}, "model", ["string"]),
        ("/v1/completions", {"model": BASE, "prompt": 7}, "prompt", ["wrong type"]),
        ("/v1/completions", {"model": BASE, "prompt": [1, "a"]}, "prompt", ["wrong type"]),
        ("/v1/completions", {"model": BASE, "prompt": "x", "stop": [1]}, "stop", ["wrong type"]),
        ("/v1/chat/completions", {"model": BASE, "messages": "hi"}, "messages", ["valid list"]),
        ("/v1/load_lora_adapter", {"lora_name": "a"}, "lora_path", ["'lora_path' is a required field"]),
        ("/v1/load_lora_adapter", {"lora_name": 3, "lora_path": "p"}, "lora_name", ["string"]),
        ("/v1/unload_lora_adapter", {}, "lora_name", ["required"]),
    ],
)
def test_missing_or_mistyped_field_is_400_naming_it(fresh, path, body, param, words):
    error_json(fresh.http.post(path, json=body), 400, param, *words)
    still_serving(fresh)


@pytest.mark.parametrize(("kwargs", "param", "words"), [
    ({"prompt": ["one", ""]}, "prompt", ["empty"]),
    ({"prompt": [[5, 6], [7, 999]]}, "prompt", ["token ids in [0, 259)"]),
    ({"prompt": "x" * 128}, "prompt", ["maximum context length is 128", "128 tokens"]),
    ({"prompt": "x" * 100, "max_tokens": 29}, "max_tokens", ["exceeds the context length"]),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", [">= 1"]),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens", [">= 1"]),
    ({"prompt": "x", "max_tokens": 1000}, "max_tokens", ["exceeds the context length"]),
    ({"prompt": "x", "temperature": 2.5}, "temperature", ["[0, 2]"]),
    ({"prompt": "x", "temperature": -0.1}, "temperature", ["[0, 2]"]),
    ({"prompt": "x", "top_p": 0.0}, "top_p", ["(0, 1]"]),
    ({"prompt": "x", "top_p": 1.5}, "top_p", ["(0, 1]"]),
    ({"prompt": "x", "extra_body": {"top_k": -5}}, "top_k", ["-1 (off)"]),
    ({"prompt": "x", "n": 0}, "n", [">= 1"]),
    ({"prompt": "", "max_tokens": 3}, "prompt", ["empty"]),
    ({"prompt": [], "max_tokens": 3}, "prompt", ["empty"]),
    ({"prompt": [5, 999999]}, "prompt", ["token ids in [0, 259)"]),
    ({"prompt": "x", "extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids", ["token ids"]),
    ({"prompt": "x", "stop": ""}, "stop", ["must not be empty"]),
    ({"prompt": "x", "logprobs": 21}, "logprobs", ["[0, 20]"]),
    ({"prompt": "x", "suffix": "!"}, "suffix", ["not supported"]),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty", ["[-2, 2]"]),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", ["stream"]),
])
def test_out_of_range_values_are_400_naming_the_field(fresh, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        fresh.client.completions.create(model=BASE, **kwargs)
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body
    assert err.value.body["type"] == "BadRequestError" and err.value.body["code"] == 400
    assert all(w in err.value.body["message"] for w in words), err.value.body
    assert not fresh.loop.submitted  # rejected before the engine
    still_serving(fresh)


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"messages": [{"role": "user", "content": "x" * 200}]}, "messages", ["maximum context length is 128"]),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 500},
            "max_tokens",
            ["exceeds the context length"],
        ),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_tokens", [">= 1"]),
        ({"messages": []}, "messages", ["at least one message"]),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages", ["chat template", "wizard"]),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
            "messages",
            ["only text"],
        ),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n", [">= 1"]),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 2}, "top_p", ["(0, 1]"]),
    ],
)
def test_bad_chat_requests_are_400(fresh, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        fresh.client.chat.completions.create(model=BASE, **kwargs)
    assert err.value.body["param"] == param and all(w in err.value.body["message"] for w in words), err.value.body
    still_serving(fresh)


# --------------------------------------------------------------------------------------------------------------
# models and adapters


def _models(s: Served) -> dict:
    return {m.id: m for m in s.client.models.list().data}


def test_models_lists_the_base_and_the_adapters_like_vllm(fresh):
    models = _models(fresh)
    assert list(models) == [BASE, "poet"]
    base, poet = models[BASE], models["poet"]
    assert base.object == "model" and base.model_extra["parent"] is None and base.model_extra["max_model_len"] == 128
    assert poet.model_extra["parent"] == BASE and poet.model_extra["root"] == str(fresh.adapters_root / "poet")
    assert fresh.client.models.retrieve("poet").id == "poet"


def test_load_and_unload_adapter_change_models_and_routing(fresh):
    path = adapter_dir(fresh.adapters_root, "pirate")
    res = fresh.http.post("/v1/load_lora_adapter", json={"lora_name": "pirate", "lora_path": str(path)})
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    assert res.text == "Success: LoRA adapter 'pirate' added successfully."
    assert list(_models(fresh)) == [BASE, "pirate", "poet"]
    assert _models(fresh)["pirate"].model_extra == {
        **_models(fresh)["pirate"].model_extra,
        "root": str(path),
        "parent": BASE,
    }
    out = fresh.client.completions.create(model="pirate", prompt="x", max_tokens=64)
    assert out.choices[0].text == "pirate says hello." and fresh.loop.submitted[-1][1] == "pirate"
    error_json(fresh.http.post("/v1/load_lora_adapter", json={"lora_name": "pirate", "lora_path": str(path)}), 400,
           "lora_name", "already been loaded")
    res = fresh.http.post("/v1/unload_lora_adapter", json={"lora_name": "pirate"})
    assert res.status_code == 200 and res.text == "Success: LoRA adapter 'pirate' removed successfully."
    assert list(_models(fresh)) == [BASE, "poet"]
    with pytest.raises(openai.NotFoundError):
        fresh.client.completions.create(model="pirate", prompt="x")
    still_serving(fresh)


def test_adapter_load_and_unload_errors(fresh, tmp_path):
    def load(name: str, path: Path):
        return fresh.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})

    error_json(load("a", tmp_path / "missing"), 400, "lora_path", "does not exist")
    (tmp_path / "plain").mkdir()
    error_json(load("a", tmp_path / "plain"), 400, "lora_path", "not an adapter")
    error_json(load(BASE, tmp_path), 400, "lora_name", "base model")
    error_json(load(" ", tmp_path), 400, "lora_name", "empty")
    error_json(fresh.http.post("/v1/unload_lora_adapter", json={"lora_name": "ghost"}), 404, "lora_name",
               "cannot be found")
    assert list(_models(fresh)) == [BASE, "poet"]
    still_serving(fresh)


def test_engine_refusals_are_503_unreadable_adapters_400_and_bugs_500(fresh, monkeypatch, tmp_path):
    def refuse(*args):
        raise RuntimeError("the server is shutting down")

    monkeypatch.setattr(fresh.loop, "submit", refuse)
    error_json(fresh.http.post("/v1/completions", json={"model": BASE, "prompt": "x"}), 503, None, "shutting down")
    monkeypatch.undo()

    def corrupt(name, path):
        raise RuntimeError("Error while deserializing header: HeaderTooLarge")

    monkeypatch.setattr(fresh.loop, "load_adapter", corrupt)
    error_json(fresh.http.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(tmp_path)}), 400,
           "lora_path", "HeaderTooLarge")
    monkeypatch.undo()

    def bug():
        raise RuntimeError("a bug")

    monkeypatch.setattr(fresh.loop, "adapter_names", bug)  # a server-side bug is a 500 in the same JSON shape
    error_json(fresh.http.get("/v1/models"), 500, None, "RuntimeError: a bug")
    monkeypatch.undo()
    still_serving(fresh)


def test_adapter_load_does_not_block_other_requests(fresh, tmp_path):
    slow = fresh.loop.load_adapter

    def load(name, path):  # a 1 s load: requests must keep flowing meanwhile
        time.sleep(1.0)
        slow(name, path)

    fresh.loop.load_adapter = load
    try:
        path = adapter_dir(tmp_path, "slowpoke")
        loader = threading.Thread(target=fresh.http.post, args=("/v1/load_lora_adapter",),
                                  kwargs={"json": {"lora_name": "slowpoke", "lora_path": str(path)}})
        loader.start()
        time.sleep(0.1)
        start = time.monotonic()
        still_serving(fresh)
        assert time.monotonic() - start < 0.8
        loader.join(timeout=10)
        assert "slowpoke" in fresh.loop.adapter_names()
    finally:
        del fresh.loop.load_adapter
        fresh.http.post("/v1/unload_lora_adapter", json={"lora_name": "slowpoke"})


# --------------------------------------------------------------------------------------------------------------
# health and metrics


def test_health_is_200_with_a_running_engine(fresh):
    res = fresh.http.get("/health")
    assert res.status_code == 200 and res.text == ""


def test_metrics_are_prometheus_text_from_loop_metrics(fresh):
    fresh.client.completions.create(model=BASE, prompt="Hello", max_tokens=4)
    res = fresh.http.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(res.text)}
    expected = fresh.loop.metrics()
    for key, value in expected.items():
        name = "bdlora_" + key.removesuffix("_total")
        assert name in families, sorted(families)
        assert families[name].type == ("counter" if key.endswith("_total") else "gauge")
        assert families[name].samples[0].value == value
    assert expected["generated_tokens_total"] >= 4 and expected["prompt_tokens_total"] >= 5


# --------------------------------------------------------------------------------------------------------------
# serve.py: arguments (checked before any process group) and the process flow with the fake engine


def _fake_megatron_dir(root: Path, tp: int = 1) -> Path:
    meg = root / "meg"
    meg.mkdir(exist_ok=True)
    (meg / "config.json").write_text("{}")
    (meg / "meta.json").write_text(json.dumps({"format": "megatron-bdlora-base", "version": 1, "tp": tp}))
    return meg


@pytest.fixture
def no_process_group(monkeypatch):
    """serve.main must fail before init_parallel: make reaching it an error."""
    import megatron_bdlora.parallel as parallel

    def forbidden(*args, **kwargs):
        raise AssertionError("a process group was created")

    monkeypatch.setattr(parallel, "init_parallel", forbidden)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def _serve_error(argv: list[str], capsys) -> str:
    from megatron_bdlora import serve

    try:
        code = serve.main(argv)
    except SystemExit as stop:  # argparse
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    import torch.distributed as dist

    assert not dist.is_initialized()
    return lines[0]


@pytest.mark.parametrize(("args", "yaml_text", "words"), [
    (["--mode", "diagonal"], None, ["--mode", "invalid choice"]),
    ([], None, ["--mode is required"]),
    (["--mode", "slora", "--max-loras", "0"], None, ["--max-loras must be >= 1"]),
    (["--mode", "slora", "--max-loras", "two"], None, ["--max-loras", "invalid int"]),
    (["--mode", "slora", "--max-loras", "4", "--max-cpu-loras", "2"], None, ["--max-cpu-loras (2)", "--max-loras (4)"]),
    (["--mode", "slora", "--port", "70000"], None, ["--port"]),
    (["--mode", "slora", "--kv-cache-gb", "0"], None, ["--kv-cache-gb must be > 0"]),
    (["--mode", "slora", "--adapter", "poet"], None, ["--adapter expects NAME=DIR", "'poet'"]),
    (["--mode", "slora", "--adapter", "a=/no/such/dir"], None, ["--adapter a", "/no/such/dir", "does not exist"]),
    (["--mode", "slora", "--tp", "2"], None, ["--tp is 2", "1 rank"]),
    (["--mode", "slora", "--frobnicate", "1"], None, ["unrecognized arguments: --frobnicate"]),
    (["--mode", "slora", "--megatron-dir", "/no/such/base"], None, ["--megatron-dir", "does not exist"]),
    (["--mode", "slora", "--megatron-dir", "EMPTY"], None, ["--megatron-dir", "neither a megatron checkpoint"]),
    (["--mode", "slora", "--megatron-dir", "MEG_TP2"], None, ["--megatron-dir", "tp=2", "1 rank"]),
    (["--config", "CONFIG"], "mode: slora\nmax_lora: 8\n", ["unknown config key", "max_lora", "serve.yaml"]),
    (["--mode", "slora", "--cuda-graphs", "maybe"], None, ["--cuda-graphs", "invalid choice"]),
    (["--config", "CONFIG"], "mode: slora\ncuda_graphs: sometimes\n", ["cuda_graphs in", "serve.yaml", "on or off"]),
    (["--config", "CONFIG"], "mode: slora\nmax_loras: many\n", ["max_loras must be int", "serve.yaml"]),
    (["--config", "CONFIG"], "mode: slora\nmax_loras: 0\n", ["max_loras in", "serve.yaml", ">= 1"]),
    (["--config", "CONFIG"], "mode: slora\ntp: 8\n", ["tp in", "is 8", "1 rank"]),
    (["--config", "CONFIG"], "mode: slora\nadapters: [a, b]\n", ["adapters must be a mapping"]),
    (["--config", "CONFIG"], "- mode\n", ["must hold a mapping"]),
    (["--config", "CONFIG"], "mode: [\n", ["not valid YAML"]),
    (["--config", "/no/such.yaml"], None, ["--config", "does not exist"]),
    (["--config", "CONFIG", "--mode", "slora"], "mode: wrong\nmax_loras: 0\n", ["max_loras in", "serve.yaml"]),
    (["--mode", "slora", "--lora-root", "EMPTY"], None, ["--lora-root", "--enable-lora-runtime-updating"]),
    (["--mode", "slora", "--enable-lora-runtime-updating", "--lora-root", "/no/such/root"], None,
     ["--lora-root", "/no/such/root", "not a directory"]),
    (["--mode", "slora", "--max-queued-requests", "0"], None, ["--max-queued-requests must be >= 1"]),
    (["--mode", "slora", "--engine-dead-timeout", "0"], None, ["--engine-dead-timeout must be > 0"]),
    (["--config", "CONFIG"], "mode: slora\nenable_lora_runtime_updating: maybe\n",
     ["enable_lora_runtime_updating must be bool"]),
])
def test_serve_argument_errors_exit_2_naming_the_flag_or_key(
    tmp_path, capsys, no_process_group, args, yaml_text, words
):
    (tmp_path / "empty").mkdir()
    (tmp_path / "tp2").mkdir()
    _fake_megatron_dir(tmp_path / "tp2", tp=2)
    config = tmp_path / "serve.yaml"
    if yaml_text is not None:
        config.write_text(yaml_text)
    subst = {"CONFIG": str(config), "EMPTY": str(tmp_path / "empty"), "MEG_TP2": str(tmp_path / "tp2" / "meg")}
    line = _serve_error([subst.get(a, a) for a in args], capsys)
    assert all(w in line for w in words), line


def test_serve_flags_override_the_yaml_and_add_adapters(tmp_path):
    from megatron_bdlora.serve import check_options, load_options

    a, b = adapter_dir(tmp_path, "a"), adapter_dir(tmp_path, "b")
    config = tmp_path / "serve.yaml"
    config.write_text(f"mode: slora\nmax-loras: 2\nmax_model_len: 256\nadapters: {{a: {a}}}\ntp: 1\nport: 9000\n")
    opts, where = load_options(
        ["--config", str(config), "--max-loras", "3", "--adapter", f"b={b}", "--mode", "replicated"]
    )
    check_options(opts, where, world_size=1)
    assert (opts.mode, opts.max_loras, opts.max_model_len, opts.port, opts.host) == (
        "replicated",
        3,
        256,
        9000,
        "127.0.0.1",
    )
    assert opts.adapters == {"a": str(a), "b": str(b)}
    assert where["max_loras"] == "--max-loras" and where["max_model_len"] == f"max_model_len in {config}"


def test_serve_exposure_settings_from_flags_yaml_and_environment(tmp_path, monkeypatch):
    from megatron_bdlora.inference.policy import API_KEY_ENV
    from megatron_bdlora.serve import check_options, load_options, policy_of

    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    r1.mkdir(), r2.mkdir()
    config = tmp_path / "serve.yaml"
    config.write_text(f"mode: slora\nenable_lora_runtime_updating: true\nlora_root: {r1}\napi_key: from-yaml\n"
                      "max_queued_requests: 9\n")
    opts, where = load_options(["--config", str(config), "--lora-root", str(r2), "--max-stop-sequences", "2"])
    check_options(opts, where, world_size=1)
    policy = policy_of(opts)
    assert (policy.api_key, policy.enable_lora_runtime_updating, policy.lora_roots) == ("from-yaml", True,
                                                                                         (str(r1), str(r2)))
    assert (policy.max_queued_requests, policy.max_stop_sequences, policy.max_request_bytes) == (9, 2, 2_000_000)
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    opts, _ = load_options(["--mode", "slora"])
    assert policy_of(opts).api_key == "from-env" and not policy_of(opts).enable_lora_runtime_updating
    opts, _ = load_options(["--mode", "slora", "--api-key", "from-flag", "--enable-lora-runtime-updating"])
    assert policy_of(opts).api_key == "from-flag" and policy_of(opts).enable_lora_runtime_updating


def test_serve_help_lists_the_limits_and_their_defaults():
    from megatron_bdlora.serve import build_parser

    text = " ".join(build_parser().format_help().split())
    for words in ("--api-key", "--enable-lora-runtime-updating", "--lora-root DIR", "--max-queued-requests N",
                  "(default 128)", "--max-request-bytes N", "(default 2000000)", "--max-stop-sequences N",
                  "(default 4)", "--engine-step-timeout X", "(default 30.0)", "--engine-dead-timeout X",
                  "(default 120.0)", "MEGATRON_BDLORA_API_KEY"):
        assert words in text, words


def test_serve_cuda_graphs_key_reads_yaml_booleans_and_needs_a_gpu(tmp_path):
    """YAML 1.1 reads a bare `on` as true: the key means the flag's on; on a host without CUDA the engine refuses
    it before reading the model."""
    from megatron_bdlora.inference.serving_loop import ServingConfig, ServingLoop
    from megatron_bdlora.serve import check_options, load_options

    config = tmp_path / "serve.yaml"
    config.write_text("mode: slora\ncuda_graphs: on\n")
    opts, where = load_options(["--config", str(config)])
    check_options(opts, where, world_size=1)
    assert opts.cuda_graphs == "on"
    assert load_options(["--config", str(config), "--cuda-graphs", "off"])[0].cuda_graphs == "off"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            ServingLoop.create(ServingConfig(megatron_dir=tmp_path / "none", cuda_graphs=True), None)


def test_serve_cli_error_in_a_fresh_process_is_fast_and_one_line(tmp_path):
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "megatron_bdlora.serve", "--mode", "block_diagonal", "--max-lora-rank", "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "WORLD_SIZE": "1"},
    )
    assert res.returncode == 2 and res.stderr == "error: --max-lora-rank must be >= 1, got -1\n", res.stderr
    assert time.monotonic() - start < 30


def run_serve_with_fake_engine(argv: list[str]) -> int:
    """serve.main with FakeLoop as the engine and a one-rank stand-in for init_parallel (subprocess entry point)."""
    import torch

    import megatron_bdlora.parallel as parallel
    from megatron_bdlora import serve
    from megatron_bdlora.inference.serving_loop import ServingConfig  # the real fields: serve.py must pass only those

    class ServingLoop(FakeLoop):
        @classmethod
        def create(cls, config: ServingConfig, info) -> "ServingLoop":
            loop = cls(config.adapters, step_s=float(os.environ.get("FAKE_STEP_S", "0.002")))
            dies_after = os.environ.get("FAKE_ENGINE_DIES_AFTER_S")
            if dies_after:
                threading.Timer(float(dies_after), lambda: setattr(loop, "alive", False)).start()
            stalls_after = os.environ.get("FAKE_ENGINE_STALLS_AFTER_S")
            if stalls_after:
                threading.Timer(float(stalls_after), lambda: setattr(loop, "stalled", True)).start()
            print(f"FAKE config {json.dumps({k: str(v) for k, v in vars(config).items()})}", flush=True)
            return loop

        def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
            stopped = super().shutdown(drain, timeout)
            print(f"FAKE shutdown drain={drain}", flush=True)
            return stopped

    engine = types.ModuleType("megatron_bdlora.inference.serving_loop")
    engine.ServingConfig, engine.ServingLoop = ServingConfig, ServingLoop
    sys.modules[engine.__name__] = engine
    parallel.init_parallel = lambda tp_size, **_: parallel.ParallelInfo(0, 1, 0, tp_size, 0, 1, torch.device("cpu"))
    parallel.destroy_parallel = lambda: None
    return serve.main(argv)


class ServeProcess:
    """`python -m megatron_bdlora.serve` (fake engine) in a subprocess, with its stdout read line by line."""

    def __init__(self, args: list[str], **env: str):
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_server; "
                "sys.exit(test_server.run_serve_with_fake_engine(sys.argv[1:]))")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "WORLD_SIZE": "1", "RANK": "0", **env},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def wait_for(self, prefix: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.stdout.append(line)
            if line.startswith(prefix):
                return line.strip()
        self.proc.kill()
        raise AssertionError(f"no {prefix!r} line; stdout {self.stdout} stderr {self.proc.stderr.read()}")

    def finish(self, timeout: float = 20) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        return code, self.proc.stderr.read()


@pytest.mark.multi_rank
def test_serve_process_drains_in_flight_requests_on_sigterm_and_exits_0(tmp_path):
    meg, poet = _fake_megatron_dir(tmp_path), adapter_dir(tmp_path, "poet")
    server = ServeProcess(["--megatron-dir", str(meg), "--mode", "block_diagonal", "--adapter", f"poet={poet}",
                           "--max-loras", "2", "--host", "127.0.0.1", "--port", "0", "--served-model-name", "base"],
                          FAKE_STEP_S="0.04")
    try:
        config = json.loads(server.wait_for("FAKE config").removeprefix("FAKE config "))
        assert config == {**config, "megatron_dir": str(meg), "mode": "block_diagonal", "max_loras": "2",
                          "adapters": str({"poet": str(poet)}), "max_model_len": "2048"}
        url = server.wait_for("serving on http://127.0.0.1:").removeprefix("serving on ")
        with httpx2.Client(base_url=url, timeout=20, trust_env=False) as http:
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["base", "poet"]
            body = {"model": "poet", "prompt": "x", "max_tokens": 60, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as res:  # 30 steps of 40 ms: 1.2 s
                lines = res.iter_lines()
                assert next(lines).startswith("data: {")
                server.proc.send_signal(signal.SIGTERM)
                time.sleep(0.4)
                with pytest.raises(httpx2.ConnectError):  # no longer accepting
                    httpx2.get(url + "/health", timeout=2, trust_env=False)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        code, stderr = server.finish()
        assert code == 0, stderr
        assert "Traceback" not in stderr, stderr
        assert server.wait_for("FAKE shutdown") == "FAKE shutdown drain=True"
    finally:
        server.proc.kill()


@pytest.mark.multi_rank
def test_serve_process_exits_1_promptly_when_the_engine_dies(tmp_path):
    server = ServeProcess(["--megatron-dir", str(_fake_megatron_dir(tmp_path)), "--mode", "slora", "--port", "0"],
                          FAKE_ENGINE_DIES_AFTER_S="1.0")
    try:
        server.wait_for("serving on")
        died = time.monotonic()
        code, stderr = server.finish(timeout=15)
        assert code == 1 and "serving engine stopped unexpectedly" in stderr, stderr
        assert time.monotonic() - died < 5
    finally:
        server.proc.kill()


@pytest.mark.multi_rank
def test_serve_process_exits_1_when_the_engine_stops_finishing_steps(tmp_path):
    server = ServeProcess(["--megatron-dir", str(_fake_megatron_dir(tmp_path)), "--mode", "slora", "--port", "0",
                           "--engine-step-timeout", "0.5", "--engine-dead-timeout", "2"],
                          FAKE_ENGINE_STALLS_AFTER_S="1.0")
    try:
        url = server.wait_for("serving on").removeprefix("serving on ")
        assert httpx2.get(url + "/health", timeout=5, trust_env=False).status_code == 200
        time.sleep(2.0)  # stalled for ~1 s: past the step timeout, not yet the dead one
        assert httpx2.get(url + "/health", timeout=5, trust_env=False).status_code == 503
        code, stderr = server.finish(timeout=15)
        assert code == 1 and "has not finished a step" in stderr and "--engine-dead-timeout 2" in stderr, stderr
    finally:
        server.proc.kill()


@pytest.mark.multi_rank
def test_serve_process_reports_a_busy_port_before_loading(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = ServeProcess(
            ["--megatron-dir", str(_fake_megatron_dir(tmp_path)), "--mode", "slora", "--port", str(port)]
        )
        code, stderr = server.finish(timeout=60)
    assert code == 2 and stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}"), stderr
    assert not any(line.startswith("FAKE config") for line in list(server.lines.queue))


# --------------------------------------------------------------------------------------------------------------
# launch/serve.sh and launch/slurm/serve.sbatch with stand-ins (python -m torch.distributed.run, srun, scontrol)


@pytest.fixture
def fake_bin(tmp_path):
    """A bin/ with `python` that prints its torchrun command line (and runs anything else for real), srun, scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "python": "#!/bin/bash\n"
        f'if [[ $1 == -m && $2 == torch.distributed.run ]]; then echo "TORCHRUN ${{*:3}}"; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n',
        "srun": '#!/bin/bash\necho "SRUN $*" >&2\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": "#!/bin/bash\nif [[ $1 == show && $2 == hostnames ]]; then echo gpu-node-7; else\n"
        'echo "NodeName=gpu-node-7 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=gpu-node-7"; fi\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _launch(script: str, args: list[str], fake_bin: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(fake_bin / "python"), "PATH": f"{fake_bin}:{os.environ['PATH']}", **env}
    return subprocess.run([str(REPO / script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "config", "nproc", "passed"), [
    (["--mode", "slora"], None, 1, ["--mode", "slora"]),
    (["--tp", "4", "--mode", "slora", "--port", "9"], None, 4, ["--mode", "slora", "--port", "9"]),
    (["--mode", "slora", "--tp=2"], None, 2, ["--mode", "slora"]),
    (["--config", "CONFIG", "--port", "9"], "tp: 3\nmode: slora\n", 3, ["--config", "CONFIG", "--port", "9"]),
    (["--config=CONFIG", "--tp", "2"], "tp: 3\n", 2, ["--config=CONFIG"]),
    (["--config", "CONFIG"], "mode: slora\n", 1, ["--config", "CONFIG"]),
])
def test_serve_sh_takes_tp_from_flag_then_config_then_1(tmp_path, fake_bin, args, config, nproc, passed):
    path = tmp_path / "serve.yaml"
    if config is not None:
        path.write_text(config)
    subst = lambda items: [a.replace("CONFIG", str(path)) for a in items]  # noqa: E731
    res = _launch("launch/serve.sh", subst(args), fake_bin)
    assert res.returncode == 0, res.stderr
    expected = " ".join(["--standalone", "--nproc_per_node", str(nproc), "-m", "megatron_bdlora.serve", *subst(passed)])
    assert res.stdout.strip() == f"TORCHRUN {expected}", res.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--tp", "0"], "positive integer"),
    (["--tp"], "--tp needs a value"),
    (["--config", "/no/such.yaml"], "does not exist"),
])
def test_serve_sh_rejects_a_bad_tp_or_config(fake_bin, args, message):
    res = _launch("launch/serve.sh", args, fake_bin)
    assert res.returncode == 2 and message in res.stderr and "TORCHRUN" not in res.stdout, res.stderr


@pytest.mark.parametrize(("args", "env", "nproc", "address", "passed"), [
    (["--mode", "block_diagonal"], {"SLURM_GPUS_ON_NODE": "8"}, 8, "http://10.1.2.3:8000",
     ["--mode", "block_diagonal", "--host", "0.0.0.0", "--port", "8000"]),
    (["--tp", "4", "--mode", "slora", "--port", "9001"], {"SLURM_GPUS_ON_NODE": "8"}, 4, "http://10.1.2.3:9001",
     ["--mode", "slora", "--port", "9001", "--host", "0.0.0.0"]),
    (["--mode", "slora", "--host", "10.9.9.9"], {"SLURM_GPUS_ON_NODE": "0", "PORT": "7000"}, 1, "http://10.9.9.9:7000",
     ["--mode", "slora", "--host", "10.9.9.9", "--port", "7000"]),
    (["--mode", "slora"], {"SLURM_GPUS_ON_NODE": "8", "NPROC_PER_NODE": "2"}, 2, "http://10.1.2.3:8000",
     ["--mode", "slora", "--host", "0.0.0.0", "--port", "8000"]),
])
def test_serve_sbatch_runs_one_torchrun_with_a_rank_per_gpu_and_prints_the_address(
    fake_bin, args, env, nproc, address, passed
):
    slurm = {
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_NODELIST": "gpu-node-7",
        "SLURM_JOB_ID": "42",
        "SLURM_CPUS_PER_TASK": "16",
    }
    res = _launch("launch/slurm/serve.sbatch", args, fake_bin, **slurm, **env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith(f"server address: {address} "), res.stdout
    expected = " ".join(["--standalone", "--nproc_per_node", str(nproc), "-m", "megatron_bdlora.serve", *passed])
    assert lines[1] == f"TORCHRUN {expected}", res.stdout
    assert "SRUN --nodes=1 --ntasks=1 --cpus-per-task=16 --kill-on-bad-exit=1 --export=ALL" in res.stderr
