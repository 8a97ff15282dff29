"""Spawn N local gloo ranks (127.0.0.1, a free port) running one function; collect each rank's return value.

Used by the tests and the single-machine benchmarks; real jobs are launched with torchrun or srun.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, tp: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from megatron_bdlora.parallel import destroy_parallel, init_parallel

    try:
        info = init_parallel(tp_size=tp, seed=1234)
        result = fn(info, *args)
        buffer = io.BytesIO()  # plain bytes: no shared-memory tensor handles outliving this process
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
        destroy_parallel()
    except BaseException:  # report to the parent, which re-raises
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable, world: int, *args: Any, tp: int | None = None, timeout: float = 600) -> list[Any]:
    """fn(ParallelInfo, *args) on `world` ranks (TP = tp or world); returns results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, tp or world, fn, args, queue), daemon=False)
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
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
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
