"""DeepSpeed as the optimiser engine for the adapter parameters only (ZeRO over the data-parallel group).

The megatron model stays as built (TP layers, frozen base); DeepSpeed sees just the LoRA factors, averages
their gradients over the data-parallel group, shards optimiser state (ZeRO 1) and gradients (ZeRO 2) over it,
clips with a TP-aware norm (TP-split factors counted on every TP rank, replicated ones once) and saves /
restores optimiser and scheduler state, reading its files with torch.load(weights_only=True). The same code path
runs on gloo/CPU and nccl/GPU.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from megatron_bdlora.training.checkpoint import load_weights_only
from megatron_bdlora.training.config import TrainConfig


class MegatronMPU:
    """The model-parallel interface DeepSpeed asks for, answered from megatron's parallel_state."""

    def __init__(self) -> None:
        self._ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_sequence_parallel_world_size(self) -> int:
        return 1


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to min_ratio at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: TrainConfig, grad_accum: int) -> dict:
    """The DeepSpeed JSON config of a run."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.parallel.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.model.dtype == "bfloat16":
        ds["bf16"] = {"enabled": True}
    return ds


def _skip_cpu_shm_build() -> None:
    """On CPU DeepSpeed JIT-compiles a shared-memory comm op at first init (~75 s); gloo does not need it."""
    if torch.cuda.is_available():
        return
    # lazy (deepspeed, here and below): its import probes the accelerators and prints a warning on stdout on CPU
    # hosts; only building an engine needs it
    import deepspeed.comm.torch  # noqa: F401  (module must be loaded to patch it)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed pickles into its optimizer files beside tensors and plain values (ZeRO 1/2, fp32 and
    bf16, deepspeed 0.19): plain data classes whose unpickling runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: str | Path, map_location: Any = None) -> Any:
    """One DeepSpeed checkpoint file, loaded weights-only (see load_weights_only)."""
    return load_weights_only(path, deepspeed_safe_globals(), map_location)


def build_engine(model: torch.nn.Module, cfg: TrainConfig, grad_accum: int):
    """(engine, lr_scheduler): DeepSpeed over the trainable (adapter) parameters with AdamW + warmup/cosine."""
    _skip_cpu_shm_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
        weight_decay=cfg.optimizer.weight_decay,
    )
    s = cfg.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, s.warmup_steps, s.train_steps, s.min_lr_ratio)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=params,
        config=deepspeed_config(cfg, grad_accum),
        mpu=MegatronMPU(),
        dist_init_required=False,
    )
    # DeepSpeed reads every model and optimizer file of engine.load_checkpoint through its checkpoint engine, whose
    # torch engine calls torch.load(weights_only=False) with no setting to change it: replace that one method
    engine.checkpoint_engine.load = load_deepspeed_file
    return engine, scheduler
