"""The GPU check's "serve_cli" part: the real `python -m megatron_bdlora.serve` command on this host, end to end.

The other serving parts build the serving loop in process; this one takes the path a user takes: a Hugging Face
Llama directory converted at start, a BD adapter from disk, HTTP on a free port, `--cuda-graphs on` on a GPU,
completions for the base and the adapter, /health and /metrics, then SIGTERM and a clean exit. The model is tiny
and random: what is checked is that the command runs on this host, not what it says.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_bdlora.bench.report import PartResult
from megatron_bdlora.bench.workload import word_tokenizer, write_random_adapter
from megatron_bdlora.config import LoRASettings

HF_CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512,
                 num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=1000,
                 max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 hidden_act="silu")
NEW_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict | str]:
    """(status, JSON body or text) of a GET, or of a POST when body is given (stdlib: nothing to install)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def write_base_and_adapter(root: Path) -> tuple[Path, Path]:
    """A random HF Llama directory with a tokenizer, and a native BD adapter (rank 8, 2 blocks) for it."""
    hf_dir, adapter_dir = root / "base", root / "adapter"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**HF_CONFIG)).save_pretrained(hf_dir, safe_serialization=True)
    word_tokenizer(HF_CONFIG["vocab_size"]).save_pretrained(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    write_random_adapter(adapter_dir, hf_config, LoRASettings(rank=8, nblocks=2), tp=1, seed=1)
    return hf_dir, adapter_dir


def gpu_check_part(smoke: bool, budget_s: float) -> PartResult:
    """Start the server, ask it, stop it; `mismatch` if any answer or the exit is not what a user should get."""
    graphs = torch.cuda.is_available()
    deadline = time.monotonic() + budget_s
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf_dir, adapter_dir = write_base_and_adapter(root)
        port = _free_port()
        env = {**os.environ, "MEGATRON_BDLORA_CACHE": str(root / "cache"), "WORLD_SIZE": "1", "RANK": "0",
               "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "megatron_bdlora.serve", "--megatron-dir", str(hf_dir), "--mode", "block_diagonal",
               "--adapter", f"poet={adapter_dir}", "--served-model-name", "base", "--host", "127.0.0.1",
               "--port", str(port), "--max-model-len", "256", "--max-num-seqs", "8", "--block-size", "16",
               "--kv-cache-gb", "0.05", "--max-lora-rank", "16", "--cuda-graphs", "on" if graphs else "off"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in proc.stdout:
                lines.append(line.rstrip())
                if line.startswith("serving on "):
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        start = time.monotonic()
        try:
            while not ready.wait(0.2):
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = "exited" if proc.poll() is not None else "did not start within the budget"
                    return PartResult("serve_cli", "error", f"the server {why}", data={"log": lines[-40:]})
            started_s = time.monotonic() - start
            answers, problems = {}, []
            url = f"http://127.0.0.1:{port}"
            timeout = max(5.0, deadline - time.monotonic())
            for model in ("base", "poet"):
                status, body = _http(f"{url}/v1/completions", {"model": model, "prompt": "t5 t6 t7 t8",
                                                               "max_tokens": NEW_TOKENS, "temperature": 0,
                                                               "ignore_eos": True}, timeout)
                answers[model] = body if isinstance(body, dict) else {}
                tokens = answers[model].get("usage", {}).get("completion_tokens") if status == 200 else None
                if tokens != NEW_TOKENS:
                    problems.append(f"{model}: HTTP {status}, {tokens} tokens: {str(body)[:200]}")
            for path in ("/health", "/metrics", "/v1/models"):
                status, _ = _http(url + path, timeout=timeout)
                if status != 200:
                    problems.append(f"GET {path}: HTTP {status}")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "killed after 60 s"
        if code != 0:
            problems.append(f"exit status after SIGTERM: {code}")
    attention = next((ln.split(": ", 1)[-1] for ln in lines if "attention path" in ln), "not logged")
    data = dict(command=" ".join(cmd[1:]), cuda_graphs=graphs, start_s=round(started_s, 1), attention=attention,
                answers={m: a.get("choices", [{}])[0].get("text") for m, a in answers.items()}, problems=problems,
                log=[ln for ln in lines if re.search(r"error|Error|Traceback", ln)][-20:])
    markdown = (f"`python -m megatron_bdlora.serve` on a random 2-layer Llama (HF directory, converted at start) with "
                f"one BD adapter, `--cuda-graphs {'on' if graphs else 'off'}`: serving after {started_s:.1f} s; "
                f"attention: {attention}; base and adapter completions of {NEW_TOKENS} tokens, /health, /metrics, "
                f"/v1/models: {'all HTTP 200' if not problems else '; '.join(problems)}; exit after SIGTERM: {code}.\n")
    return PartResult("serve_cli", "mismatch" if problems else "ok", "; ".join(problems), data=data, markdown=markdown)
