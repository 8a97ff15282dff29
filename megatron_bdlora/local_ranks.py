"""Spawn N local gloo ranks (127.0.0.1, a free port) running one function; collect each rank's return value.

Used by the tests and the single-machine benchmarks; real jobs are launched with torchrun or srun.

Ranks fork from a fork server that has imported torch, megatron-core and our model once (and a script's own
module, whose workers the ranks unpickle): a freshly spawned rank spends ~5 s on those imports on a 2-core
machine, which the test suite would pay some forty times. multiprocessing hands each rank the caller's sys.path
and working directory; the caller's environment is passed here, as the server's is that of when it started. The
function and its arguments travel as plain bytes: torch would otherwise move every tensor argument to shared
memory and send one file descriptor each, and a fork server takes at most 256 per process.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import traceback
from typing import Any, Callable, Mapping

import torch
import torch.multiprocessing as mp

from megatron_bdlora.parallel import destroy_parallel, init_parallel


def free_port() -> int:
    """A TCP port nobody listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# imported once by the fork server; "__main__" is a script's own module (a no-op under `python -m`)
PRELOAD = ["__main__", "megatron_bdlora.parallel", "megatron_bdlora.model"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _pack(obj: Any) -> bytes:
    """Plain bytes (torch.save): no shared-memory tensor handles or file descriptors cross the process boundary."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _unpack(payload: bytes) -> Any:
    return torch.load(io.BytesIO(payload), weights_only=False)


def _entry(rank: int, world: int, port: int, tp: int, job: bytes, queue, env: Mapping[str, str]) -> None:
    os.environ.clear()
    os.environ.update(
        env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        fn, args = _unpack(job)
        info = init_parallel(tp_size=tp, seed=1234)
        result = fn(info, *args)
        queue.put((rank, "ok", _pack(result)))
        destroy_parallel()
    except BaseException:  # report to the parent, which re-raises
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable, world: int, *args: Any, tp: int | None = None, timeout: float = 600) -> list[Any]:
    """fn(ParallelInfo, *args) on `world` ranks (TP = tp or world); returns results in rank order."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    env, job = dict(os.environ), _pack((fn, args))
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, tp or world, job, queue, env), daemon=False)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    for _ in range(world):
        try:
            rank, status, payload = queue.get(timeout=timeout)
        except queue_module.Empty:  # a rank died or hung
            errors.append(f"no result within {timeout}s; exit codes {[p.exitcode for p in procs]}")
            break
        if status == "ok":
            results[rank] = _unpack(payload)
        else:
            errors.append(f"rank {rank}:\n{payload}")
            break
    for p in procs:
        p.join(timeout=timeout if not errors else 5)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
