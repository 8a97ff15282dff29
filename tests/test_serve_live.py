"""The real server under torchrun (TP=2, the serving engine, gloo), driven by the official openai client.

Greedy outputs are checked against the independent reference (each request alone, adapter merged, full
recompute); then runtime load/unload, bad requests, a bounded load of 100 concurrent requests over 4 adapters
with 2 device slots, and the death of a non-zero TP rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pytest

from megatron_bdlora.local_ranks import free_port, run_distributed
from serving_reference import merged_references, serve_base, write_adapters

ROOT = Path(__file__).resolve().parents[1]
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


class LiveServer:
    """torchrun -m megatron_bdlora.serve on 127.0.0.1; output collected in the background."""

    def __init__(self, tp: int, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
               "-m", "megatron_bdlora.serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(300) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("server did not start:\n" + "".join(self.lines[-60:]))
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "serving on http://" in line:
                self.ready.set()

    def log(self) -> str:
        return "".join(self.lines[-80:])

    def stop(self) -> int | None:
        """SIGTERM to the server process (rank 0): it drains, stops the other ranks, and torchrun exits with them."""
        if self.proc.poll() is None:
            try:
                os.kill(_rank_pid(self.proc.pid, 0), signal.SIGTERM)
                self.proc.wait(90)
            except (AssertionError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        return self.proc.returncode


def references_worker(info, adapters, requests):
    """Greedy reference tokens at TP=1 (the same math as the TP=2 server, up to float rounding)."""
    return [tokens for tokens, _ in merged_references(serve_base(1), 1, 0, adapters, "block_diagonal", requests)]


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank."""
    for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} under {parent}")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    meg = serve_base(2)
    adapters = write_adapters(root, meg, 2, ["a0", "a1", "a2", "a3"])
    server = LiveServer(2, ["--megatron-dir", str(meg), "--mode", "block_diagonal", "--adapter", f"a0={adapters['a0']}",
                            "--adapter", f"a1={adapters['a1']}", "--max-loras", "2", "--max-lora-rank", "16",
                            "--max-model-len", "128", "--max-num-seqs", "16", "--kv-cache-gb", "0.05"])
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
        streamed = "".join(c.choices[0].text for c in tok.create(model=model, prompt=prompt, max_tokens=8, stream=True, **GREEDY) if c.choices)
        assert streamed == got.choices[0].text, f"{model}: stream differs from the non-streamed text"
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=6, **GREEDY)
        chat_stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}],
                                                     max_tokens=6, stream=True, **GREEDY)
        assert "".join(c.choices[0].delta.content or "" for c in chat_stream if c.choices) == chat.choices[0].message.content
        assert chat.choices[0].finish_reason == "length"
    # load and unload at runtime
    load = httpx2.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": adapters["a2"]}, timeout=60)
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
    for bad in (dict(max_tokens=0), dict(max_tokens=10_000), dict(max_tokens=4, temperature=-1.0), dict(max_tokens=4, top_p=2.0)):
        with pytest.raises(openai.BadRequestError):
            tok.create(model="a0", prompt=[1, 2, 3], **bad)
    with pytest.raises(openai.BadRequestError):
        tok.create(model="a0", prompt=list(range(1, 200)), max_tokens=2)  # longer than --max-model-len
    raw = httpx2.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "error" in raw.json()
    for body in ({"lora_name": "x", "lora_path": "/does/not/exist"}, {"lora_name": "x", "lora_path": str(ROOT / "docs")}):
        r = httpx2.post(server.url + "/v1/load_lora_adapter", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"], r.text
    assert tok.create(model="a0", prompt=prompts["a0"], max_tokens=8, **GREEDY).choices[0].text == tokenizer.decode(refs[1], skip_special_tokens=True)
    assert httpx2.get(server.url + "/health").status_code == 200


def test_live_server_100_concurrent_requests_over_4_adapters_equal_one_by_one(live):
    server, meg, adapters = live
    client = server.client
    names = [m.id for m in client.models.list().data]
    for name in ("a1", "a3"):
        if name not in names:
            assert httpx2.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": adapters[name]}, timeout=60).status_code == 200
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
    loads = [float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("bdlora_adapter_loads_total")]
    evictions = [float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("bdlora_adapter_evictions_total")]
    assert loads and loads[0] > 4 and evictions and evictions[0] > 0, metrics  # 4 adapters through 2 slots


def test_killing_a_non_zero_tp_rank_makes_the_server_exit_non_zero_within_60s(live):
    server, _, _ = live
    os.kill(_rank_pid(server.proc.pid, 1), signal.SIGKILL)
    start = time.monotonic()
    try:
        code = server.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("the server still runs 60 s after a TP rank died:\n" + server.log())
    assert code != 0, server.log()
    assert time.monotonic() - start <= 60
