"""The multi-adapter LoRA ops (ops.lora_shrink / lora_expand), one suite for both backends: torch, and the Triton
kernels (in Triton's interpreter on CPU). Checked against per-token float64 math on every output element: slots of
different ranks and block counts (nblocks = TP and 2 TP), idle slots, uneven segments, tokens without an adapter
(left bit-identical in a poisoned output), fused output layouts, all-gathered rank spaces, fp32 and fp16."""

from __future__ import annotations

import os

import pytest
import torch
from ops_reference import check, poisoned_stack, reference_expand, reference_shrink, sorted_tokens

from megatron_bdlora.lora_batch import FactorView, OutputLayout, SlotBatch
from megatron_bdlora.ops import lora_expand, lora_shrink, use_backend
from megatron_bdlora.sharding import ShardingPlan

TP, RANK, D_IN, D_OUT = 2, 16, 64, 48
TOKENS = [  # per-token slots: uneven segments, slot 4 idle, -1 = base model only
    [0, 2, -1, 1, 1, 0, 3, 2, 2, 0, -1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 1],
    [3, 3, 3, -1, 0],
]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _views(kind: str, mode: str, rank: int, nblocks: int | None) -> tuple[FactorView, FactorView]:
    """Rank 0's local views of A and B for an adapter of this plan at TP=2."""
    plan = ShardingPlan.build(kind, mode, D_IN, D_OUT, rank, TP, nblocks)
    return FactorView(*plan.a.local_shape, plan.a.local_blocks), FactorView(*plan.b.local_shape, plan.b.local_blocks)


def _slot_views(kind: str, mode: str) -> list[tuple[FactorView, FactorView] | None]:
    """Six slots: the capacity adapter, a lower rank, BD with nblocks = 2 TP, a rank-4 one, idle, capacity again."""
    bd = mode == "block_diagonal"
    return [
        _views(kind, mode, RANK, None),
        _views(kind, mode, RANK // 2, None),
        _views(kind, mode, RANK, 2 * TP if bd else None),
        _views(kind, mode, 4, None),
        None,
        _views(kind, mode, RANK, None),
    ]


CASES = [("column", "block_diagonal"), ("row", "block_diagonal"), ("column", "slora"), ("row", "replicated")]


@pytest.mark.parametrize("kind,mode", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_shrink_and_expand_match_float64_per_token(backend, kind, mode, dtype, seed):
    dev = _device()
    slot_views = _slot_views(kind, mode)
    views_a = [v and v[0] for v in slot_views]
    views_b = [v and v[1] for v in slot_views]
    cap_a, cap_b = slot_views[0]
    a = poisoned_stack(views_a, (cap_a.rows, cap_a.cols), dtype, seed).to(dev)
    b = poisoned_stack(views_b, (cap_b.rows, cap_b.cols), dtype, seed + 100).to(dev)
    scalings = torch.tensor([0.5, 2.0, 1.0, 0.25, 9.0, 3.0], device=dev)
    slot_ids = TOKENS[seed % len(TOKENS)]
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(len(slot_ids), D_IN if kind == "column" else D_IN // TP, generator=g).to(dtype).to(dev)
    batch = SlotBatch.from_slot_ids(torch.tensor(slot_ids, device=dev), len(slot_views))

    z = lora_shrink(x, a, views_a, batch)
    assert z.shape == (len(slot_ids), cap_a.rows)
    check(z.cpu(), reference_shrink(x.cpu(), a.cpu(), views_a, slot_ids), dtype, f"shrink {kind}/{mode}")

    chunks = TP if (kind, mode) == ("column", "slora") else 1  # S-LoRA column: z all-gathered from TP ranks
    if chunks > 1:
        other = torch.randn(z.shape, generator=g).to(z.dtype).to(dev) * (z != 0)  # another rank's piece
        z = torch.cat([z, other], dim=-1)
    out_width = D_OUT if kind == "row" else cap_b.rows
    poison = torch.randn(len(slot_ids), out_width, generator=g).to(dtype).to(dev)
    out = poison.clone()
    layout = OutputLayout.contiguous(cap_b.rows)
    assert lora_expand(z, b, views_b, scalings, batch, out, layout, chunks) is out
    want = reference_expand(poison.cpu(), z.cpu(), b.cpu(), views_b, scalings.cpu(), slot_ids, layout, chunks)
    check(out.cpu(), want, dtype, f"expand {kind}/{mode}")
    for t, s in enumerate(slot_ids):
        if s < 0:
            assert torch.equal(out[t], poison[t]), f"token {t} has no adapter: its output row must stay bit-identical"


def test_fused_layout_and_row_slice(backend):
    """q/k-like adapters expand straight into one fused output (2 groups of [q | k]); a row S-LoRA slice lands
    at its rank's offset; columns outside each layout stay bit-identical."""
    dev, dtype = _device(), torch.float32
    slot_ids = [1, 0, -1, 1, 0, 0]
    batch = SlotBatch.from_slot_ids(torch.tensor(slot_ids, device=dev), 2)
    g = torch.Generator().manual_seed(3)
    vq, vk = [FactorView(16, 8), FactorView(16, 4)], [FactorView(8, 8), FactorView(8, 8)]
    bq, bk = poisoned_stack(vq, (16, 8), dtype, 1).to(dev), poisoned_stack(vk, (8, 8), dtype, 2).to(dev)
    zq, zk = torch.randn(6, 8, generator=g).to(dev), torch.randn(6, 8, generator=g).to(dev)
    scalings = torch.tensor([1.5, 0.5], device=dev)
    poison = torch.randn(6, 30, generator=g).to(dev)  # 24 fused columns, then 6 nobody addresses
    out = poison.clone()
    lq, lk = OutputLayout(8, 12, 0), OutputLayout(4, 12, 8)  # per group: q 8 columns, k 4
    lora_expand(zq, bq, vq, scalings, batch, out, lq)
    lora_expand(zk, bk, vk, scalings, batch, out, lk)
    want = reference_expand(poison.cpu(), zq.cpu(), bq.cpu(), vq, scalings.cpu(), slot_ids, lq)
    want = reference_expand(want, zk.cpu(), bk.cpu(), vk, scalings.cpu(), slot_ids, lk)
    check(out.cpu(), want, dtype, "fused q/k")
    assert torch.equal(out[:, 24:], poison[:, 24:]) and torch.equal(out[2], poison[2])

    out = poison.clone()
    row_slice = OutputLayout(8, 8, 16)  # this rank's 8 of 24 columns
    lora_expand(zk, bk, vk, scalings, batch, out, row_slice)
    check(
        out.cpu(),
        reference_expand(poison.cpu(), zk.cpu(), bk.cpu(), vk, scalings.cpu(), slot_ids, row_slice),
        dtype,
        "row slice",
    )


def test_slot_metadata_is_refilled_in_place():
    """The per-step metadata lands in fixed buffers (CUDA-graph safe) and says what the tokens are."""
    buffers = SlotBatch.buffers(16, 4, "cpu")
    pointers = [t.data_ptr() for t in (buffers.order, buffers.slot_starts, buffers.slot_counts, buffers.active_slots)]
    for slot_ids in ([2, -1, 0, 2, 2, 0, -1], [3, 3, 1]):
        batch = SlotBatch.from_slot_ids(torch.tensor(slot_ids), 4, buffers)
        assert [
            t.data_ptr() for t in (batch.order, batch.slot_starts, batch.slot_counts, batch.active_slots)
        ] == pointers
        assert batch.order.tolist() == sorted_tokens(slot_ids)
        counts = [slot_ids.count(s) for s in range(4)]
        assert batch.slot_counts.tolist() == counts
        starts = [slot_ids.count(-1) + sum(counts[:s]) for s in range(4)]
        assert batch.slot_starts.tolist() == starts
        active = [s for s in range(4) if counts[s]]
        assert batch.active_slots.tolist() == active + [-1] * (4 - len(active))
        assert batch.num_active.item() == len(active)
        assert batch.segments == tuple((s, starts[s], starts[s] + counts[s]) for s in active)
    with pytest.raises(ValueError, match="slot buffers hold 16 tokens"):
        SlotBatch.from_slot_ids(torch.zeros(17, dtype=torch.long), 4, buffers)


def test_gathered_and_per_slot_torch_paths_agree(monkeypatch):
    import megatron_bdlora.ops as ops

    views = [FactorView(16, 64), None, FactorView(16, 64)]
    a = poisoned_stack(views, (16, 64), torch.float32, 3)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([0, 2, 2, 0, 2])
    with use_backend("torch"):
        got = lora_shrink(x, a, views, SlotBatch.from_slot_ids(ids, 3))  # slots 0 and 2: one gathered matmul
        monkeypatch.setattr(ops, "GATHER_TOKENS", 0)  # force one matmul per slot
        want = lora_shrink(x, a, views, SlotBatch.from_slot_ids(ids, 3))
    assert torch.allclose(got, want, atol=1e-6)


def test_forcing_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    batch = SlotBatch.from_slot_ids(torch.tensor([0]), 1)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lora_shrink(torch.zeros(1, 64), torch.zeros(1, 16, 64), [FactorView(16, 64)], batch)
    with pytest.raises(ValueError, match="expected one of"):
        use_backend("cuda").__enter__()
