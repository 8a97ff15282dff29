"""The multi-adapter LoRA op (ops.lora_shrink / lora_expand) against per-token float64 math: slots of different
ranks and block counts, uneven and empty segments, tokens without an adapter, batched and per-slot paths."""

from __future__ import annotations

import pytest
import torch

from megatron_bdlora.ops import FactorView, SlotBatch, lora_expand, lora_shrink
from megatron_bdlora.sharding import packed_to_block_diagonal

D_IN, D_OUT, R = 24, 36, 12


def _stacks(seed: int, views_a, views_b):
    """Factor stacks [slots, R, D_IN] / [slots, D_OUT, R] with only each slot's view filled (rest poisoned)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.full((len(views_a), R, D_IN), float("nan"))
    b = torch.full((len(views_b), D_OUT, R), float("nan"))
    for s, (va, vb) in enumerate(zip(views_a, views_b)):
        if va is not None:
            a[s, : va.rows, : va.cols] = torch.randn(va.rows, va.cols, generator=g)
            b[s, : vb.rows, : vb.cols] = torch.randn(vb.rows, vb.cols, generator=g)
    return a, b


def _dense(stack, slot, v):
    return packed_to_block_diagonal(stack[slot, : v.rows, : v.cols].double(), v.blocks)  # [rows, in_width]


VIEWS = [  # (A view, B view) per slot: rank 12 dense, rank 6 dense, rank 12 with 3 blocks in A and 2 in B, rank 4
    (FactorView(12, 24, 1), FactorView(36, 12, 1)),
    (FactorView(6, 24, 1), FactorView(36, 6, 1)),
    (FactorView(12, 8, 3), FactorView(36, 6, 2)),
    (FactorView(4, 24, 1), FactorView(36, 4, 1)),
    (FactorView(12, 24, 1), FactorView(36, 12, 1)),  # same view as slot 0: batched together with it
]


@pytest.mark.parametrize("slot_ids", [
    [0, 4, 2, -1, 1, 0, 3, 4, 2, 1],  # decode-like: a few tokens per slot (slots 0 and 4 gathered together)
    [2] * 70 + [0, -1, 4, 4, 0],  # a long segment (per-slot path) and short ones
    [-1, -1, -1],  # nobody uses an adapter
    [1, 1, 1, 1],  # one slot, already grouped (no gather / scatter)
])
@pytest.mark.parametrize("seed", [0, 1])
def test_shrink_expand_match_per_token_float64(slot_ids, seed):
    a, b = _stacks(seed, [v[0] for v in VIEWS], [v[1] for v in VIEWS])
    scalings = torch.tensor([0.5, 2.0, 1.0, 0.25, 3.0])
    views_a, views_b = [v[0] for v in VIEWS], [v[1] for v in VIEWS]
    ids = torch.tensor(slot_ids)
    x = torch.randn(len(slot_ids), D_IN, generator=torch.Generator().manual_seed(seed + 10))
    batch = SlotBatch.from_slot_ids(ids)
    xs = batch.gather(x)
    y = batch.scatter(lora_expand(lora_shrink(xs, a, views_a, batch), b, views_b, scalings, batch))
    assert y.shape == (len(slot_ids), D_OUT) and not torch.isnan(y).any()
    for t, s in enumerate(slot_ids):
        if s < 0:
            assert torch.equal(y[t], torch.zeros(D_OUT)), f"token {t} has no adapter: its output must stay zero"
            continue
        va, vb = VIEWS[s]
        want = scalings[s].double() * (_dense(b, s, vb) @ (_dense(a, s, va) @ x[t].double()))
        assert (y[t].double() - want).abs().max() <= 1e-5 * want.abs().max(), f"token {t} slot {s}"


def test_gathered_and_per_slot_paths_agree(monkeypatch):
    import megatron_bdlora.ops as ops

    a, b = _stacks(3, [v[0] for v in VIEWS], [v[1] for v in VIEWS])
    views_a = [VIEWS[0][0], None, None, None, VIEWS[4][0]]
    batch = SlotBatch.from_slot_ids(torch.tensor([0, 4, 4, 0, 4]))  # slots 0 and 4: one gathered matmul
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(4))
    got = lora_shrink(batch.gather(x), a, views_a, batch)
    monkeypatch.setattr(ops, "GATHER_TOKENS", 0)  # force one matmul per slot
    want = lora_shrink(batch.gather(x), a, views_a, SlotBatch.from_slot_ids(torch.tensor([0, 4, 4, 0, 4])))
    assert torch.allclose(got, want, atol=1e-6)
