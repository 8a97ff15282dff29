"""A fake ServingLoop behind the real HTTP app, for the server tests (test_server.py, test_server_limits.py).

FakeLoop implements the ServingLoop interface with canned text: a byte-level tokenizer and a background thread that
emits two tokens per request per step, ending requests as TokenEvent defines (max_tokens: 'length'; end of the
canned text, a stop string or a stop id: 'stop'; cancel: 'abort'). A sampled request with a seed says the seed
first ("[7] The capital..."), so that tests can tell which seed each choice used. Log-probabilities follow
`fake_logprob` (the same for a token wherever it is), so that tests can check the answers' formatting exactly.
HTTP servers run uvicorn on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx2
import openai

from megatron_bdlora.inference.policy import ServerPolicy
from megatron_bdlora.inference.requests import MAX_LOGPROBS, GenerationParams, TokenEvent, TokenLogprob

BASE = "fake-base"
CANNED = {None: "The capital of France is Paris.", "poet": "Of Man's first disobedience, and the fruit"}
FILLER = " and so on"
LIKELIEST = tuple(range(3 + ord("a"), 3 + ord("a") + MAX_LOGPROBS))  # the fake model's top tokens: 'a', 'b', ...


def fake_logprob(token_id: int, k: int) -> TokenLogprob:
    """The fake model's score of a token and its top k: 'a', 'b', 'c', ... at -0.25, -0.5, -0.75, ...; any other
    token at -6 - (id % 4), below all of them."""
    ranked = {t: -0.25 * (rank + 1) for rank, t in enumerate(LIKELIEST)}
    return TokenLogprob(token_id, ranked.get(token_id, -6.0 - token_id % 4), tuple(
        (t, ranked[t]) for t in LIKELIEST[:k]))


# --------------------------------------------------------------------------------------------------------------
# the fake engine


class ByteTokenizer:
    """ids 0, 1, 2: pad, bos, eos; then one id per UTF-8 byte (id = byte + 3). Adds no special tokens (as SmolLM2's
    tokenizer): add_special_tokens=True puts bos first, to show that the flag arrived."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 256 + 3

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        return [self.bos_token_id] * bool(add_special_tokens) + [b + 3 for b in text.encode()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, return_dict=False):
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {m['role']!r}")  # what a template's raise_exception does
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )
        return self.encode(text) if tokenize else text


@dataclass
class _FakeJob:
    request_id: int
    events: queue.Queue
    planned: list[int]
    finish_reason: str
    prompt_tokens: int
    adapter: str | None
    params: GenerationParams
    prompt_logprobs: tuple | None = None  # sent with the first event
    sent: int = 0


class FakeLoop:
    """The ServingLoop interface (rank 0 side) with canned token streams instead of a model."""

    base_name = BASE
    max_model_len = 128

    def __init__(self, adapters: dict[str, str] | None = None, step_s: float = 0.002):
        self.tokenizer = ByteTokenizer()
        self.adapters = dict(adapters or {})
        self.step_s = step_s
        self.alive = True
        self.stalled = False  # a hung engine: no step finishes (last_step_at stops moving)
        self.last_step_at = time.monotonic()
        self.max_loras = 2
        self.submitted: list[tuple[list[int], str | None, GenerationParams]] = []
        self.cancelled: list[int] = []
        self.shutdowns: list[bool] = []
        self.counters = dict.fromkeys(("generated_tokens_total", "prompt_tokens_total", "requests_finished_total",
                                       "adapter_loads_total", "adapter_evictions_total"), 0)
        self._jobs: dict[int, _FakeJob] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the engine thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.step_s):
            if not self.alive or self.stalled:
                continue  # a dead or hung engine emits nothing
            self.last_step_at = time.monotonic()
            with self._lock:
                for job in list(self._jobs.values()):
                    new = job.planned[job.sent:job.sent + 2]
                    job.sent += len(new)
                    done = job.sent == len(job.planned)
                    self.counters["generated_tokens_total"] += len(new)
                    k = job.params.logprobs
                    job.events.put(TokenEvent(job.request_id, tuple(new), self.tokenizer.decode(new), done,
                                              job.finish_reason if done else None,
                                              error="injected failure" if job.finish_reason == "error" else None,
                                              prompt_tokens=job.prompt_tokens, completion_tokens=job.sent,
                                              logprobs=() if k is None else tuple(fake_logprob(t, k) for t in new),
                                              prompt_logprobs=job.prompt_logprobs))
                    job.prompt_logprobs = None
                    if done:
                        del self._jobs[job.request_id]
                        self.counters["requests_finished_total"] += 1

    def _plan(self, prompt_ids: list[int], adapter: str | None, params: GenerationParams) -> tuple[list[int], str]:
        if "FAIL" in self.tokenizer.decode(prompt_ids):
            return [], "error"
        text = CANNED.get(adapter, f"{adapter} says hello.")
        if params.seed is not None and not params.greedy:
            text = f"[{params.seed}] {text}"
        ids = self.tokenizer.encode(text)
        if params.ignore_eos:
            ids += self.tokenizer.encode(FILLER * (params.max_tokens // len(FILLER) + 1))
        reason = "stop" if len(ids) < params.max_tokens else "length"
        ids = ids[:params.max_tokens]
        for stop_id in params.stop_token_ids:
            if stop_id in ids:
                ids, reason = ids[:ids.index(stop_id)], "stop"
        keep = params.include_stop_str_in_output
        cuts = [(c + len(s) * keep) for s in params.stop if (c := self.tokenizer.decode(ids).find(s)) >= 0]
        if cuts:
            ids, reason = ids[:min(cuts)], "stop"  # bytes = tokens here
        return ids, reason

    @staticmethod
    def _prompt_logprobs(prompt_ids: list[int], params: GenerationParams) -> tuple | None:
        k = params.prompt_logprobs
        return None if k is None else (None, *(fake_logprob(t, k) for t in prompt_ids[1:]))

    # -- the interface
    def submit(self, prompt_ids: list[int], adapter: str | None, params: GenerationParams):
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(adapter)
        params.check(len(prompt_ids), self.max_model_len)
        planned, reason = self._plan(list(prompt_ids), adapter, params)
        with self._lock:
            self._next_id += 1
            job = _FakeJob(self._next_id, queue.Queue(), planned, reason, len(prompt_ids), adapter, params,
                           self._prompt_logprobs(list(prompt_ids), params))
            self._jobs[job.request_id] = job
            self.submitted.append((list(prompt_ids), adapter, params))
            self.counters["prompt_tokens_total"] += len(prompt_ids)
        return job.request_id, job.events

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self.cancelled.append(request_id)
            job = self._jobs.pop(request_id, None)
            if job is not None:
                job.events.put(TokenEvent(request_id, (), "", True, "abort", prompt_tokens=job.prompt_tokens,
                                          completion_tokens=job.sent))

    def load_adapter(self, name: str, path: str) -> None:
        time.sleep(0.05)  # blocking, as reading safetensors is
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already registered")
        if not Path(path).exists():
            raise FileNotFoundError(f"adapter directory {path} does not exist")
        if not any((Path(path) / f).is_file() for f in ("adapter_manifest.json", "adapter_config.json")):
            raise ValueError(f"{path} is not an adapter directory (no adapter_manifest.json or adapter_config.json)")
        self.adapters[name] = path
        self.counters["adapter_loads_total"] += 1

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(name)
        del self.adapters[name]
        self.counters["adapter_evictions_total"] += 1

    def adapter_names(self) -> list[str]:
        return sorted(self.adapters)

    def metrics(self) -> dict[str, float]:
        with self._lock:
            return {"running": len(self._jobs), "waiting": 0, **self.counters}

    def healthy(self) -> bool:
        return self.alive

    def lora_info(self) -> dict:
        with self._lock:
            running = sorted({job.adapter for job in self._jobs.values() if job.adapter is not None})
        return {"max_lora": self.max_loras, "running": running, "waiting": []}

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
        self.shutdowns.append(drain)
        for _ in range(1000):  # bounded: 10 s
            if not drain or not self._jobs:
                break
            time.sleep(0.01)
        self._stop.set()
        return True

    def run_follower(self) -> None:
        raise AssertionError("rank 0 only in these tests")


# --------------------------------------------------------------------------------------------------------------
# fixtures


def adapter_dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text("{}")
    return path


@dataclass
class Served:
    """A running server: its fake loop, base URL and clients."""

    loop: FakeLoop
    url: str
    client: openai.OpenAI
    http: httpx2.Client
    adapters_root: Path


def serving(root: Path, policy: ServerPolicy, loop: FakeLoop | None = None, key: str = "x") -> Iterator[Served]:
    """A started fake loop (with adapter "poet") behind the real app with `policy`; yields Served, its openai client
    holding `key`; stops both after."""
    from megatron_bdlora.inference.routes import build_app

    poet = adapter_dir(root, "poet")
    loop = loop or FakeLoop({"poet": str(poet)})
    loop.start()
    server, thread = start_http(build_app(loop, adapter_paths={"poet": str(poet)}, policy=policy))
    http = httpx2.Client(base_url=server.url, timeout=20, trust_env=False)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=20,
                           http_client=httpx2.Client(trust_env=False))
    try:
        yield Served(loop, server.url, client, http, root)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        loop.shutdown(drain=False)


def start_http(app, host: str = "127.0.0.1"):
    from megatron_bdlora.serve import HTTPServer, listen_socket

    server = HTTPServer(app, listen_socket(host, 0), host)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for _ in range(200):  # bounded: 10 s
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    return server, thread


def still_serving(s: Served) -> None:
    """After an error: a normal request still works."""
    out = s.client.completions.create(model=BASE, prompt="Q", max_tokens=64)
    assert out.choices[0].text == CANNED[None] and out.choices[0].finish_reason == "stop"


def error_json(res: httpx2.Response, status: int, param: str | None = None, *words: str) -> dict:
    """The OpenAI error JSON of a raw response, checked for shape, status, param and message words."""
    assert res.status_code == status, res.text
    body = res.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["code"] == status and err["param"] == param, err
    assert err["type"] == {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                           409: "ConflictError", 413: "RequestTooLargeError", 429: "RateLimitError",
                           500: "InternalServerError", 503: "ServiceUnavailableError"}[status]
    for word in words:
        assert word in err["message"], err
    return err


