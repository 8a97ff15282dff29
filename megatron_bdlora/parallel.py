"""Process groups from torchrun / Slurm environment variables: gloo on CPU, nccl on GPU."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_bdlora.cpu import apply_cpu_shims


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits: global rank, TP rank/size, DP rank/size, and the device it computes on."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def init_parallel(tp_size: int, seed: int = 1234, backend: str | None = None, timeout_s: float = 600.0) -> ParallelInfo:
    """Join the default process group (torchrun or srun variables) and build megatron's TP x DP groups.

    `timeout_s` bounds every collective (torch's default is 10 minutes): a server passes its engine bound, so that a
    rank waiting on a dead or hung peer fails instead of waiting that long."""
    # lazy (here and in destroy_parallel): megatron-core takes seconds to import, and serve.py and the benchmark tools
    # import this module before they parse their flags
    from megatron.core import parallel_state, tensor_parallel

    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if world_size % tp_size:
        raise ValueError(f"world size {world_size} is not divisible by tensor-parallel size {tp_size}")
    use_cuda = torch.cuda.is_available()
    if use_cuda:  # before the group: nccl's communicators (and barrier) use the current device
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size,
                                                 distributed_timeout_minutes=timeout_s / 60)
    if not apply_cpu_shims(seed):
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelInfo(
        rank=rank,
        world_size=world_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=tp_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (tests spawn many in one session)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
