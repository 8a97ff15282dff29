"""Multi-adapter LoRA factor application: one signature for training (one slot) and serving (a slot per token).

A LoRA branch is two `apply_factor` calls (shrink x -> rank-r, expand rank-r -> out); the sharding plan
decides the weights' local shapes and block counts, so this module knows nothing about TP.
"""

from __future__ import annotations

import torch


def apply_factor(
    x: torch.Tensor,
    weight: torch.Tensor,
    blocks: int,
    slot_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ factor.T for a stack of (optionally block-diagonal, packed) factors.

    x: [..., in]; weight: [slots, out, in / blocks] (block j maps input chunk j to output chunk j);
    slot_ids: None (every token uses slot 0) or [tokens] with tokens = x[..., 0].numel(), -1 = no adapter.
    Returns [..., out].
    """
    if slot_ids is None:
        return _apply_one(x, weight[0], blocks)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [t, in]
    out = x2.new_zeros(x2.shape[0], weight.shape[1])  # [t, out]
    for slot in torch.unique(slot_ids).tolist():
        if slot < 0:
            continue
        idx = (slot_ids == slot).nonzero(as_tuple=True)[0]
        out = out.index_copy(0, idx, _apply_one(x2.index_select(0, idx), weight[slot], blocks))
    return out.reshape(*lead, weight.shape[1])


def _apply_one(x: torch.Tensor, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """x @ W.T with W packed block-diagonal: [out, in/blocks]."""
    if blocks == 1:
        return torch.matmul(x, weight.t())
    out_dim, block_in = weight.shape
    xb = x.reshape(*x.shape[:-1], blocks, block_in)  # [..., k, in/k]
    wb = weight.reshape(blocks, out_dim // blocks, block_in)  # [k, out/k, in/k]
    yb = torch.einsum("...ki,koi->...ko", xb, wb)  # [..., k, out/k]
    return yb.reshape(*x.shape[:-1], out_dim)


def scale_rows(z: torch.Tensor, scaling: torch.Tensor, slot_ids: torch.Tensor | None) -> torch.Tensor:
    """Multiply each token's rank-r intermediate by its slot's LoRA scaling (alpha / r or alpha / sqrt(r))."""
    if slot_ids is None:
        return z * scaling[0]
    per_token = scaling[slot_ids.clamp(min=0)].to(z.dtype)  # [t]
    return (z.reshape(-1, z.shape[-1]) * per_token[:, None]).reshape(z.shape)
