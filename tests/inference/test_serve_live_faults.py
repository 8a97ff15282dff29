"""Issue 22's acceptance on the real server under torchrun (TP=2, the serving engine, gloo): requests that used to
stop the server, then authentication, runtime loading under --lora-root, overload, body size, a long prompt, and a
hung TP rank (SIGSTOP), in that order (the last one ends the server).

Every adapter and the base answer a fixed greedy request with the same text before and after each fault.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pytest
from live_server import LiveServer, rank_pid
from serving_reference import serve_base, write_adapters

from megatron_bdlora.inference.policy import API_KEY_ENV

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

KEY = "live-key"
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})
PROMPT = [101, 102, 103, 104]
STEP_TIMEOUT_S, DEAD_TIMEOUT_S = 3, 15


class Live:
    """The server, its key-holding client and raw HTTP client, the adapters' root, and each model's fixed answer."""

    def __init__(self, server: LiveServer, root: Path, outside: Path):
        self.server, self.root, self.outside = server, root, outside
        self.client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        self.http = httpx2.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                                  trust_env=False)
        self.base = self.client.models.list().data[0].id
        self.answers: dict[str, str] = {}

    def answer(self, model: str) -> str:
        return self.client.completions.create(model=model, prompt=PROMPT, max_tokens=8, **GREEDY).choices[0].text

    def check_unchanged(self) -> None:
        """Every model still answers, with the text it gave at the start; /health is 200."""
        assert self.http.get("/health").status_code == 200, self.server.log()
        for model, text in self.answers.items():
            assert self.answer(model) == text, f"{model} changed:\n{self.server.log()}"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    root, outside = tmp / "root", tmp / "outside"
    meg = serve_base(2)
    made = write_adapters(tmp / "made", meg, 2, ["a0", "a1", "a2", "a3"])
    for name in ("a0", "a1", "gone", "swapped"):  # gone / swapped: copies of a2 / a3 that the tests break
        shutil.copytree(made[{"gone": "a2", "swapped": "a3"}.get(name, name)], root / name)
    shutil.copytree(made["a2"], root / "spare")
    shutil.copytree(made["a2"], outside / "spare")
    server = LiveServer(2, ["--megatron-dir", str(meg), "--mode", "block_diagonal",
                            *[a for n in ("a0", "a1", "gone", "swapped") for a in ("--adapter", f"{n}={root / n}")],
                            "--max-loras", "2", "--max-cpu-loras", "2", "--max-lora-rank", "16",
                            "--max-model-len", "128", "--max-num-seqs", "8", "--kv-cache-gb", "0.05",
                            "--enable-lora-runtime-updating", "--lora-root", str(root), "--max-queued-requests", "8",
                            "--engine-step-timeout", str(STEP_TIMEOUT_S), "--engine-dead-timeout", str(DEAD_TIMEOUT_S)],
                        env={API_KEY_ENV: KEY})
    live = Live(server, root, outside)
    try:
        for model in (live.base, "a0", "a1"):
            live.answers[model] = live.answer(model)
        yield live
    finally:
        live.http.close()
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGCONT)  # a rank the last test stopped
        server.stop()


def _load(live: Live, name: str, path: Path | str) -> httpx2.Response:
    return live.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def _unload(live: Live, name: str) -> httpx2.Response:
    return live.http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def test_tiny_temperatures_and_seeds_at_and_beyond_int64(live):
    for temperature in (1e-40, 1e-8, 0.0099, 2.0):
        chat = live.client.chat.completions.create(model="a0", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=4, temperature=temperature, seed=7)
        assert chat.choices[0].finish_reason in ("length", "stop")
    for bad in (2.0001, -1e-40):
        with pytest.raises(openai.BadRequestError):
            live.client.completions.create(model="a0", prompt=PROMPT, max_tokens=2, temperature=bad)
    for seed in (2**63 - 1, -(2**63)):
        out = live.client.completions.create(model="a1", prompt=PROMPT, max_tokens=3, temperature=1.0, seed=seed)
        assert out.choices[0].finish_reason == "length"
    for seed in (2**63, 2**64, -(2**63) - 1):
        res = live.http.post("/v1/completions", json={"model": "a1", "prompt": PROMPT, "max_tokens": 3,
                                                      "temperature": 1.0, "seed": seed})
        assert res.status_code == 400 and res.json()["error"]["param"] == "seed", res.text
    live.check_unchanged()


def test_two_concurrent_unloads_and_two_concurrent_loads_of_one_name(live):
    assert _load(live, "twice", live.root / "spare").status_code == 200
    with ThreadPoolExecutor(2) as pool:
        codes = sorted(r.status_code for r in pool.map(lambda _: _unload(live, "twice"), range(2)))
    assert codes[0] == 200 and codes[1] in (200, 404, 409), codes
    assert "twice" not in [m.id for m in live.client.models.list().data]
    shutil.copytree(live.root / "spare", live.root / "spare2")
    paths = [live.root / "spare", live.root / "spare2"]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: _load(live, "dup", p), paths))
    codes = [r.status_code for r in results]
    assert sorted(codes)[0] == 200 and sorted(codes)[1] in (400, 409), [r.text for r in results]
    winner = paths[codes.index(200)]
    assert live.client.models.retrieve("dup").model_extra["root"] == str(winner.resolve())
    assert _unload(live, "dup").status_code == 200
    live.check_unchanged()


def test_adapter_deleted_or_replaced_on_disk_fails_only_its_requests(live):
    # a0 and a1 take both slots and both host entries: gone and swapped must be re-read from disk when asked for
    shutil.rmtree(live.root / "gone")
    shutil.rmtree(live.root / "swapped")
    shutil.copytree(live.root / "a1", live.root / "swapped")  # another valid adapter under the same path
    for model in ("a0", "a1"):
        assert live.answer(model) == live.answers[model]
    for name, words in (("gone", "could not be re-read"), ("swapped", "changed on disk")):
        res = live.http.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 4})
        assert res.status_code == 500 and words in res.json()["error"]["message"], res.text
        with live.http.stream("POST", "/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 4,
                                                                "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line]
        assert words in events[-2] and events[-1] == "data: [DONE]", events
    live.check_unchanged()


def test_api_key_is_needed_on_v1_and_not_on_health_or_metrics(live):
    url = live.server.url
    for key in ("wrong", "-"):
        client = live.client.with_options(api_key=key)
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model="a0", prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    with httpx2.Client(base_url=url, trust_env=False, timeout=30) as bare:
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/v1/models/a0"), ("POST", "/v1/load_lora_adapter"),
                             ("POST", "/v1/unload_lora_adapter")):
            assert bare.request(method, path, json={}).status_code == 401, path
        assert bare.get("/health").status_code == 200
        assert "vllm:lora_requests_info" in bare.get("/metrics").text


def test_runtime_loading_only_under_the_lora_root(live):
    (live.root / "escape").symlink_to(live.outside / "spare", target_is_directory=True)
    messages = set()
    for path in (live.root / ".." / "outside" / "spare", live.outside / "spare", live.root / "escape",
                 live.outside / "missing"):
        res = _load(live, "intruder", path)
        assert res.status_code == 400, res.text
        messages.add(res.json()["error"]["message"])
    assert len(messages) == 1
    assert _load(live, "inside", live.root / "spare").status_code == 200
    assert live.answer("inside")
    assert _unload(live, "inside").status_code == 200


def test_forty_concurrent_requests_with_a_queue_of_8_get_200s_and_429s(live):
    def one(i: int) -> httpx2.Response:
        return live.http.post("/v1/completions", json={"model": ("a0", "a1")[i % 2], "prompt": PROMPT,
                                                       "max_tokens": 8, "temperature": 0.0, "ignore_eos": True})

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40)))
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    for i, res in enumerate(results):
        if res.status_code == 200:
            assert res.json()["choices"][0]["text"] == live.answers[("a0", "a1")[i % 2]]
        else:
            assert res.headers["retry-after"] == "1"
    live.check_unchanged()


def test_body_limit_and_a_long_prompt_does_not_delay_health(live):
    res = live.http.post("/v1/completions", content=b'{"prompt": "' + b"x" * 3_000_000 + b'"}',
                         headers={"Content-Type": "application/json"})
    assert res.status_code == 413, res.text
    done = threading.Event()
    result = {}

    def send() -> None:
        result["res"] = live.http.post("/v1/completions", json={"model": "a0", "prompt": "word " * 40_000})
        done.set()

    sender = threading.Thread(target=send)
    sender.start()
    delays = []
    while not done.is_set() and len(delays) < 200:  # bounded
        start = time.monotonic()
        assert live.http.get("/health").status_code == 200
        delays.append(time.monotonic() - start)
        time.sleep(0.02)
    sender.join(timeout=60)
    assert result["res"].status_code == 400 and "maximum context length" in result["res"].text
    assert max(delays, default=0) <= 1.0, delays
    live.check_unchanged()


def test_a_hung_rank_turns_health_503_and_the_server_exits_non_zero(live):
    """Last: it ends the server."""
    server = live.server
    rank0 = rank_pid(server.proc.pid, 0)
    os.kill(rank_pid(server.proc.pid, 1), signal.SIGSTOP)
    stopped = time.monotonic()
    threading.Thread(target=lambda: live.http.post("/v1/completions", json={"model": "a0", "prompt": PROMPT}),
                     daemon=True).start()  # work for the engine: its next step waits on rank 1
    status = None
    while time.monotonic() - stopped < STEP_TIMEOUT_S + 10 and status != 503:
        try:
            status = httpx2.get(server.url + "/health", timeout=2, trust_env=False).status_code
        except httpx2.HTTPError:
            status = None
        time.sleep(0.2)
    assert status == 503, server.log()
    while Path(f"/proc/{rank0}").exists() and time.monotonic() - stopped < DEAD_TIMEOUT_S + 10:
        time.sleep(0.2)
    assert not Path(f"/proc/{rank0}").exists(), f"rank 0 still runs {DEAD_TIMEOUT_S + 10} s after rank 1 hung"
    try:
        code = server.proc.wait(60)  # torchrun then stops the other rank (SIGTERM, then SIGKILL: it is stopped)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun still runs a minute after rank 0 exited:\n" + server.log())
    log = "".join(server.lines)
    assert code != 0 and "has not finished a step" in log, log
