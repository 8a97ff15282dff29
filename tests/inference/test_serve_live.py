"""The real server under torchrun (TP=2, the serving engine, gloo), driven by the official openai client.

Greedy outputs are checked against the independent reference (each request alone, adapter merged, full
recompute); then runtime load/unload, bad requests, a bounded load of 100 concurrent requests over 4 adapters
with 2 device slots, and the death of a non-zero TP rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pytest
from live_server import LiveServer, rank_pid
from serving_reference import merged_references, serve_base, write_adapters

from megatron_bdlora.local_ranks import run_distributed

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]  # each test needs the TP=2 server (~8 s to start on 2 cores)

ROOT = Path(__file__).resolve().parents[2]
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


def references_worker(info, adapters, requests):
    """Greedy reference tokens at TP=1 (the same math as the TP=2 server, up to float rounding)."""
    return [tokens for tokens, _ in merged_references(serve_base(1), 1, 0, adapters, "block_diagonal", requests)]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    meg = serve_base(2)
    adapters = write_adapters(root, meg, 2, ["a0", "a1", "a2", "a3"])
    server = LiveServer(2, ["--megatron-dir", str(meg), "--mode", "block_diagonal", "--adapter", f"a0={adapters['a0']}",
                            "--adapter", f"a1={adapters['a1']}", "--max-loras", "2", "--max-lora-rank", "16",
                            "--max-model-len", "128", "--max-num-seqs", "16", "--kv-cache-gb", "0.05",
                            "--enable-lora-runtime-updating"])
    yield server, meg, adapters
    server.stop()


def test_live_server_matches_references_streams_loads_unloads_and_survives_bad_requests(live):
    server, meg, adapters = live
    client = server.client
    base = client.models.list().data[0].id
    assert [m.id for m in client.models.list().data] == [base, "a0", "a1"]
    assert all(m.parent == base for m in client.models.list().data[1:])
    prompts = {None: [101, 102, 103, 104], "a0": [201, 202, 203], "a1": [301, 302, 303, 304, 305]}
    tok = client.completions  # completions with token-id prompts: exactly the reference's inputs
    refs = run_distributed(references_worker, 1, adapters, [(p, a, 8) for a, p in prompts.items()])[0]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(meg)
    for (adapter, prompt), want in zip(prompts.items(), refs):
        model = adapter or base
        got = tok.create(model=model, prompt=prompt, max_tokens=8, **GREEDY)
        assert got.choices[0].text == tokenizer.decode(want, skip_special_tokens=True), f"{model}: text differs"
        assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 8
        assert got.usage.prompt_tokens == len(prompt)
        streamed = "".join(
            c.choices[0].text
            for c in tok.create(model=model, prompt=prompt, max_tokens=8, stream=True, **GREEDY)
            if c.choices
        )
        assert streamed == got.choices[0].text, f"{model}: stream differs from the non-streamed text"
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=6, **GREEDY
        )
        chat_stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}],
                                                     max_tokens=6, stream=True, **GREEDY)
        assert (
            "".join(c.choices[0].delta.content or "" for c in chat_stream if c.choices)
            == chat.choices[0].message.content
        )
        assert chat.choices[0].finish_reason == "length"
    # load and unload at runtime
    load = httpx2.post(
        server.url + "/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": adapters["a2"]}, timeout=60
    )
    assert load.status_code == 200, load.text
    unload = httpx2.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "a1"}, timeout=60)
    assert unload.status_code == 200, unload.text
    assert [m.id for m in client.models.list().data] == [base, "a0", "a2"]
    want_a2 = run_distributed(references_worker, 1, adapters, [(prompts["a0"], "a2", 6)])[0][0]
    got = tok.create(model="a2", prompt=prompts["a0"], max_tokens=6, **GREEDY).choices[0].text
    assert got == tokenizer.decode(want_a2, skip_special_tokens=True)
    # bad requests: OpenAI-style errors, the server keeps serving
    with pytest.raises(openai.NotFoundError):
        tok.create(model="a1", prompt=[1, 2], max_tokens=2)
    for bad in (
        dict(max_tokens=0),
        dict(max_tokens=10_000),
        dict(max_tokens=4, temperature=-1.0),
        dict(max_tokens=4, top_p=2.0),
    ):
        with pytest.raises(openai.BadRequestError):
            tok.create(model="a0", prompt=[1, 2, 3], **bad)
    with pytest.raises(openai.BadRequestError):
        tok.create(model="a0", prompt=list(range(1, 200)), max_tokens=2)  # longer than --max-model-len
    raw = httpx2.post(
        server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and "error" in raw.json()
    for body in (
        {"lora_name": "x", "lora_path": "/does/not/exist"},
        {"lora_name": "x", "lora_path": str(ROOT / "docs")},
    ):
        r = httpx2.post(server.url + "/v1/load_lora_adapter", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"], r.text
    assert tok.create(model="a0", prompt=prompts["a0"], max_tokens=8, **GREEDY).choices[0].text == tokenizer.decode(
        refs[1], skip_special_tokens=True
    )
    assert httpx2.get(server.url + "/health").status_code == 200


def test_live_server_100_concurrent_requests_over_4_adapters_equal_one_by_one(live):
    server, meg, adapters = live
    client = server.client
    names = [m.id for m in client.models.list().data]
    for name in ("a1", "a3"):
        if name not in names:
            assert (
                httpx2.post(
                    server.url + "/v1/load_lora_adapter",
                    json={"lora_name": name, "lora_path": adapters[name]},
                    timeout=60,
                ).status_code
                == 200
            )
    work = [(["a0", "a1", "a2", "a3"][i % 4], [1000 + i, 2000 + i % 7, 3000 + i % 5]) for i in range(100)]

    def ask(item):
        model, prompt = item
        return client.completions.create(model=model, prompt=prompt, max_tokens=4, **GREEDY).choices[0].text

    one_by_one = [ask(item) for item in work]
    deadline = time.monotonic() + 300
    with ThreadPoolExecutor(max_workers=100) as pool:
        together = list(pool.map(ask, work, timeout=300))
    assert time.monotonic() < deadline
    assert together == one_by_one
    metrics = httpx2.get(server.url + "/metrics").text
    loads = [float(m.split()[-1]) for m in metrics.splitlines() if m.startswith("bdlora_adapter_loads_total")]
    evictions = [float(m.split()[-1]) for m in metrics.splitlines() if m.startswith("bdlora_adapter_evictions_total")]
    assert loads and loads[0] > 4 and evictions and evictions[0] > 0, metrics  # 4 adapters through 2 slots


def test_killing_a_non_zero_tp_rank_makes_the_server_exit_non_zero_within_60s(live):
    server, _, _ = live
    os.kill(rank_pid(server.proc.pid, 1), signal.SIGKILL)
    start = time.monotonic()
    try:
        code = server.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("the server still runs 60 s after a TP rank died:\n" + server.log())
    assert code != 0, server.log()
    assert time.monotonic() - start <= 60
