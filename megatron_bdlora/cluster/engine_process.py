"""One TP group of the single server, as child processes of a replica: `torchrun --standalone --nproc_per_node TP
-m megatron_bdlora.serve --config replica.yaml --host 127.0.0.1 --port 0`.

Why a child process tree and not the engine inside the replica actor: the single server already owns everything a
TP group needs (rank processes, the lockstep loop, the HTTP protocol, draining, a watchdog that exits when a rank
dies), so a replica reuses it unchanged and a crashed engine never takes the replica's event loop with it. It
listens on 127.0.0.1 only: the ingress reaches it through the replica, never directly.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from megatron_bdlora.inference.policy import API_KEY_ENV

_PR_SET_PDEATHSIG = 1
_READY = re.compile(r"serving on (http://\S+)")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the replica process dies, even by SIGKILL (Linux), so that a replica
    Ray kills never leaves an engine behind (torchrun passes the signal on to its ranks). The thread that starts
    the engine must live as long as the replica: the replica's event loop thread does."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EngineStartError(RuntimeError):
    """The engine exited or stayed silent before it said where it serves; the message ends with its last output."""


class EngineProcess:
    """A single server started (torchrun and its TP ranks, in their own session); `url` once wait_ready returned."""

    def __init__(self, settings: dict, tp: int, api_key: str | None, cwd: str, env: dict[str, str]) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="bdlora-replica-")
        config = Path(self._dir.name) / "server.yaml"
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
               "-m", "megatron_bdlora.serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0"]
        child_env = {**os.environ, **env}
        child_env.pop(API_KEY_ENV, None)
        if api_key is not None:  # in the environment, not the YAML or argv: kept out of files and `ps`
            child_env[API_KEY_ENV] = api_key
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True, preexec_fn=_die_with_parent)
        self.lines: collections.deque[str] = collections.deque(maxlen=80)
        self.url = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read_output, name="engine-output", daemon=True).start()

    def _read_output(self) -> None:
        """Keep the engine's last lines (for errors), echo them to the replica's log, and catch the ready line."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            print(line, end="", flush=True)
            found = _READY.search(line)
            if found and not self._ready.is_set():
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()  # exited: stop waiting

    def wait_ready(self, timeout_s: float) -> str:
        """Block until the engine serves (its URL); EngineStartError if it exits or stays silent."""
        if not self._ready.wait(timeout_s):
            raise EngineStartError(f"the engine did not say `serving on` within {timeout_s:g} s; its last output:\n"
                                   + self.output())
        if not self.url:
            self.proc.wait(30)
            raise EngineStartError(f"the engine exited with code {self.proc.returncode} before serving; its last "
                                   "output:\n" + self.output())
        return self.url

    def output(self) -> str:
        return "".join(self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rank0_pid(self) -> int | None:
        """The pid of the process that serves HTTP (torchrun's RANK=0 worker), e.g. for a fault test to kill."""
        for pid in subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"RANK=0" in environ:
                return int(pid)
        return None

    def stop(self, grace_s: float = 60.0) -> int | None:
        """SIGTERM to torchrun (which passes it to the ranks: rank 0 drains), SIGKILL to the session after grace_s."""
        if self.alive():
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.alive():
            self._signal(signal.SIGKILL)
            self.proc.wait(30)
        self._signal(signal.SIGKILL)  # ranks that outlived torchrun
        self._dir.cleanup()
        return self.proc.returncode

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
