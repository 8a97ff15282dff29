"""What one optimizer step saw and did, per adapter parameter: gradients, Adam moments, the gradient norm.

The gradients DeepSpeed hands the optimizer (after accumulation and the data-parallel reduce, before clipping)
are what the loss scaling must get exactly right, whatever the TP / DP / accumulation split. `logging.dump_steps`
writes them, the weights before the step and Adam's first moment after it as native adapter directories, so two
runs at different TP / DP can be compared (reshard) and checked against a float64 reference.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def full_grad(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's whole (TP-local) accumulated gradient, assembled from ZeRO partitions (collective over DP)."""
    # lazy (deepspeed, here and below): as in deepspeed_engine.py, its import probes the accelerators and prints on
    # stdout; the trainer imports this module before any engine exists
    from deepspeed.utils import safe_get_full_grad

    grad = safe_get_full_grad(param)
    if grad is None:
        raise RuntimeError(
            f"no gradient for a LoRA factor of shape {tuple(param.shape)}: call after backward, before step"
        )
    return grad


def optimizer_state(engine, key: str) -> Callable[[torch.nn.Parameter], torch.Tensor]:
    """param -> its full optimizer state `key` (ZeRO partitions assembled; the plain optimizer's own at stage 0)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    def get(param: torch.nn.Parameter) -> torch.Tensor:
        value = safe_get_full_optimizer_state(param, key)
        return value if value is not None else engine.optimizer.state[param][key]

    return get


def stage0_grad_norm(params: list[torch.nn.Parameter], tp_group: dist.ProcessGroup) -> float:
    """L2 norm of the DP-reduced gradients without ZeRO (DeepSpeed reports none there): TP-split factors counted
    on every TP rank, replicated ones once, as DeepSpeed's clipping counts them."""
    first = parallel_state.get_tensor_model_parallel_rank() == 0
    sq = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)  # nccl: on the device
    for p in params:
        if p.grad is not None and (first or getattr(p, "tensor_model_parallel", False)):
            sq += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(sq, group=tp_group)
    return sq.sqrt().item()
