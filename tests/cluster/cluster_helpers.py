"""Test helpers for the cluster: PEFT adapters for the embedded SmolLM2, and `python -m megatron_bdlora.serve_cluster`
started in its own session until it says where it serves, stopped with SIGTERM (Ray shut down by the command)."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import openai
import torch
from peft_reference import peft_model, random_factors

from megatron_bdlora.config import LoRASettings
from megatron_bdlora.local_ranks import free_port

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_CLUSTER = ROOT / "configs" / "serve-cluster-smollm2.yaml"
_READY = re.compile(r"^serving on (http://\S+)")


def smollm2_peft_adapters(root: Path, names: list[str]) -> dict[str, str]:
    """PEFT LoRA adapters for the embedded SmolLM2 (written by PEFT itself), random and strong enough to change the
    greedy text; name -> directory."""
    from transformers import LlamaForCausalLM

    from megatron_bdlora.base_models import EMBEDDED, resolve_hf_base

    hf_model = LlamaForCausalLM.from_pretrained(resolve_hf_base(EMBEDDED), dtype=torch.float32)
    hf_config = hf_model.config.to_dict()
    out = {}
    for i, name in enumerate(names):
        settings = LoRASettings(rank=4, alpha=8, nblocks=1, targets=("q_proj", "v_proj", "o_proj"))
        factors = random_factors(hf_config, settings, seed=200 + i, scale=0.15)
        peft_model(copy.deepcopy(hf_model), settings, factors).save_pretrained(root / name)
        out[name] = str(root / name)
    return out


class ClusterServer:
    """python -m megatron_bdlora.serve_cluster on 127.0.0.1; its output collected in the background."""

    def __init__(self, args: list[str], start_timeout_s: float = 240) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "megatron_bdlora.serve_cluster", *args, "--host", "127.0.0.1",
               "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(start_timeout_s) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("cluster did not start:\n" + self.log())
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=180)
        self.http = httpx2.Client(base_url=self.url, timeout=60)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if _READY.match(line):
                self.ready.set()

    def log(self, lines: int = 120) -> str:
        return "".join(self.lines[-lines:])

    def replicas(self) -> list[dict]:
        """The replicas reporting at /health (id, healthy, engine pid)."""
        return self.http.get("/health").json()["replicas"]

    def wait_for(self, predicate, timeout_s: float, what: str) -> list[dict]:
        """Poll /health until predicate(replicas) holds; the replicas then."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            replicas = self.replicas()
            if predicate(replicas):
                return replicas
            time.sleep(0.5)
        raise AssertionError(f"{what}: not within {timeout_s:g} s; replicas {self.replicas()}\n{self.log()}")

    def stop(self) -> int | None:
        """SIGTERM: the command drains the replicas and shuts Ray down; the session is killed if it does not."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # Ray's own processes, should any have outlived the command
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        return self.proc.returncode
