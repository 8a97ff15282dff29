"""Serving matmuls against frozen base weights on CPU through oneDNN, each weight reordered once.

torch's float32 CPU matmul calls MKL, which at serving sizes (a few decode tokens, or a prompt chunk, against a
large weight) computes at a fraction of the core's rate on the AMD EPYC hosts we run on (one thread: ~9 GB/s of
weight read at 8 tokens). oneDNN with the weight reordered once into its blocked layout (what torch's own CPU
freezing passes and inductor use) runs the same products 2-4x faster (docs/benchmarks.md). Serving weights are
frozen, so the reorder is paid once per weight: cached on its layer and redone only when the weight's storage or
version changes (a merged adapter, a reload). The cost is a second copy of the base weights in host memory.

`pack_frozen_linears(model)` turns it on for a model's TP linear layers (the serving engine does, on CPU);
`MEGATRON_BDLORA_ONEDNN=0` turns it off (A/B benchmarks). Training, autograd, sequence parallelism and CUDA
tensors always take megatron's own path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

PACKED_DTYPES = (torch.float32,)  # where torch's CPU matmul is MKL's (bf16/fp16 already go through oneDNN)
_ATTR = "_onednn_weight"  # on a layer: (key of the packed weight, packed weight); absent = not enabled


def onednn_enabled() -> bool:
    """Whether serving engines built from now on pack their CPU weights (oneDNN present, not switched off)."""
    return torch.backends.mkldnn.is_available() and os.environ.get("MEGATRON_BDLORA_ONEDNN", "1") != "0"


def pack_frozen_linears(model: torch.nn.Module) -> int:
    """Serve `model`'s column/row-parallel layers through oneDNN on CPU (weights packed lazily, on first use);
    returns how many layers. LoRA layers call `frozen_forward_impl` themselves, megatron's get it installed."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # (seconds to import: lazy)

    if not onednn_enabled():
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear):
            continue
        if not hasattr(module, _ATTR):
            setattr(module, _ATTR, (None, None))
            if not getattr(module, "calls_frozen_forward", False):  # megatron's layer: wrap its bound method
                module._forward_impl = functools.partial(frozen_forward_impl, module, module._forward_impl)
        count += 1
    return count


def is_packed(module: torch.nn.Module) -> bool:
    """Whether `pack_frozen_linears` enabled oneDNN for this layer (its LoRA factors may use it too)."""
    return getattr(module, _ATTR, None) is not None


def frozen_forward_impl(module: torch.nn.Module, original: Callable[..., torch.Tensor], input: torch.Tensor,
                        weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A TP linear layer's `_forward_impl` (megatron's signature): the inference product of a frozen weight without
    megatron's autograd Function, through oneDNN where `pack_frozen_linears` enabled it; anything else `original`."""
    if torch.is_grad_enabled() or args or kwargs.get("sequence_parallel"):
        return original(input, weight, *args, **kwargs)
    base = frozen_matmul(module, input, weight)
    bias = kwargs.get("bias")
    return base if bias is None else base + bias


def frozen_matmul(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T ([..., in] -> [..., out]) with the weight's oneDNN packing cached on `module` when enabled."""
    cached = getattr(module, _ATTR, None)
    if cached is None or x.device.type != "cpu" or x.dtype != weight.dtype or weight.dtype not in PACKED_DTYPES:
        return torch.matmul(x, weight.t())
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    packed = cached[1]
    if cached[0] != key:
        packed = pack_weight(weight)
        setattr(module, _ATTR, (key, packed))
    return packed_linear(x, packed)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight reordered once into oneDNN's blocked layout, for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ W.T ([..., in] -> [..., out]) for W packed by `pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
