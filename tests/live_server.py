"""The real server under torchrun on 127.0.0.1 (`torchrun -m megatron_bdlora.serve`), for the live serving tests
(test_serve_live.py, test_serving_smollm2.py): started until it says where it serves, driven with the official
openai client, stopped with SIGTERM to rank 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai

from megatron_bdlora.local_ranks import free_port

ROOT = Path(__file__).resolve().parents[1]


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
                os.kill(rank_pid(self.proc.pid, 0), signal.SIGTERM)
                self.proc.wait(90)
            except (AssertionError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        return self.proc.returncode


def rank_pid(parent: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank."""
    for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} under {parent}")
