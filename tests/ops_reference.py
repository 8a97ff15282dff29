"""Float64 references for the multi-adapter LoRA ops, shared by test_ops.py (both backends) and test_kernels.py
(the Triton kernels' own knobs): poisoned factor stacks, per-token shrink / expand, and the tolerance check."""

from __future__ import annotations

import torch

from megatron_bdlora.lora_batch import FactorView, OutputLayout
from megatron_bdlora.sharding import packed_to_block_diagonal

# tolerance on max |got - want| relative to max |want|: float32 accumulates <= 64 products (~1e-6);
# float16 stores z and out with a unit roundoff of 2**-11 ~ 4.9e-4, so 1e-3 is two roundings' worth
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3}


def poisoned_stack(views: list[FactorView | None], shape: tuple[int, int], dtype, seed: int) -> torch.Tensor:
    """A factor stack with each slot's view filled and everything else poisoned (NaN must never be read)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((len(views), *shape), float("nan"))
    for s, v in enumerate(views):
        if v is not None:
            out[s, : v.rows, : v.cols] = torch.randn(v.rows, v.cols, generator=g)
    return out.to(dtype)


def dense(stack: torch.Tensor, slot: int, v: FactorView) -> torch.Tensor:
    return packed_to_block_diagonal(stack[slot, : v.rows, : v.cols].double(), v.blocks)  # [rows, in_width]


def sorted_tokens(slot_ids: list[int]) -> list[int]:
    return sorted(range(len(slot_ids)), key=lambda t: slot_ids[t])  # stable: the slot order the ops promise


def reference_shrink(x, a, views, slot_ids) -> torch.Tensor:
    """z [n, R] in slot order, float64: A_s x_t in the slot's rows, zero elsewhere."""
    z = torch.zeros(len(slot_ids), a.shape[1], dtype=torch.float64)
    for i, t in enumerate(sorted_tokens(slot_ids)):
        s = slot_ids[t]
        if s >= 0 and views[s] is not None:
            v = views[s]
            z[i, : v.rows] = dense(a, s, v) @ x[t, : v.in_width].double()
    return z


def reference_expand(out, z, b, views, scalings, slot_ids, layout: OutputLayout, chunks: int = 1) -> torch.Tensor:
    """out + scaling_s B_s z at the layout's columns, float64; rows of tokens without an adapter unchanged."""
    want = out.double().clone()
    piece = z.shape[1] // chunks
    for i, t in enumerate(sorted_tokens(slot_ids)):
        s = slot_ids[t]
        if s < 0 or views[s] is None:
            continue
        v = views[s]
        per = v.in_width // chunks
        u = torch.cat([z[i, c * piece : c * piece + per] for c in range(chunks)]).double()  # the slot's rank space
        y = scalings[s].double() * (dense(b, s, v) @ u)
        cols = [
            (c // layout.group_width) * layout.group_stride + layout.offset + c % layout.group_width
            for c in range(v.rows)
        ]
        want[t, cols] += y
    return want


def check(got: torch.Tensor, want: torch.Tensor, dtype, what: str) -> None:
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert not torch.isnan(got).any(), f"{what}: NaN (a poisoned element was read)"
    assert err <= TOLERANCE[dtype] * scale, f"{what}: max error {err:.3g} vs max {scale:.3g}"
