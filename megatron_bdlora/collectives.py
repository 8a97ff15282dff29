"""The collectives of a LoRA branch, as named autograd functions (so they can be counted and audited).

Only S-LoRA communicates: a column layer all-gathers the rank-r intermediate (adjoint: reduce-scatter,
which *sums* every rank's gradient before splitting); a row layer all-reduces it (adjoint: all-reduce too,
because each rank feeds the summed intermediate into its own rows of B, so the gradient is a sum over ranks).
Replicated factors get their weight gradient summed over TP with megatron's copy-to-region (identity
forward, all-reduce backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    all_gather_last_dim_from_tensor_parallel_region,
    copy_to_tensor_model_parallel_region,
)

from megatron_bdlora.sharding import Collective


class _AllReduceWithAllReduceGrad(torch.autograd.Function):
    """Sum a partial over TP ranks whose result each rank consumes differently: all-reduce both ways."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = partial.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_rank_intermediate(partial: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Row S-LoRA: (tokens, r) partial sums -> full A x on every rank; gradients summed over ranks."""
    return _AllReduceWithAllReduceGrad.apply(partial, group)


def gather_rank_intermediates(
    parts: list[torch.Tensor], collective: Collective, group: dist.ProcessGroup
) -> list[torch.Tensor]:
    """Run one collective over the rank-r intermediates of all sub-projections of a layer.

    parts[s]: [..., r_s (/ tp when all-gathered)]. The parts are concatenated so a fused layer (qkv, gate/up)
    still pays a single collective, then split back per sub-projection.
    """
    if collective is Collective.NONE:
        return parts
    sizes = [p.shape[-1] for p in parts]
    cat = torch.cat(parts, dim=-1)  # [..., sum r_s(/tp)]
    if collective is Collective.ALL_REDUCE:
        return list(all_reduce_rank_intermediate(cat, group).split(sizes, dim=-1))
    tp = group.size()
    gathered = all_gather_last_dim_from_tensor_parallel_region(cat, group=group)  # [..., tp * sum]
    by_rank = gathered.reshape(*cat.shape[:-1], tp, sum(sizes))  # [..., tp, sum]
    # each sub-projection's full intermediate is its per-rank slices in rank order
    return [p.reshape(*cat.shape[:-1], tp * s) for p, s in zip(by_rank.split(sizes, dim=-1), sizes)]


def sum_grad_over_tp(weight: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """A factor replicated over TP: identity forward, its gradient all-reduced so ranks stay identical."""
    return copy_to_tensor_model_parallel_region(weight, group=group)


def all_gather_dim0(shard: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every TP rank's shard along dim 0 (no autograd: merging and exporting only)."""
    if group.size() == 1:
        return shard
    shards = [torch.empty_like(shard) for _ in range(group.size())]
    dist.all_gather(shards, shard.contiguous(), group=group)
    return torch.cat(shards, dim=0)
