"""The packed serving path of fused layers: one shrink for q/k/v (gate/up) and one expand into the fused output give
what three (two) separate single-projection layers give, in float64, with mixed ranks and block counts in one batch
and an adapter that skips a sub-projection, in every mode, at TP 1 and 2; slot loads after the first packed forward
are seen by the next one (the adapters' factors are views of the packed stack, not copies), and stay views after a
module conversion (.to())."""

from __future__ import annotations

import pytest
import torch
from test_layers import MODES, _config

from megatron_bdlora.local_ranks import run_distributed

pytestmark = pytest.mark.multi_rank

D_IN, RANK, SLOTS = 16, 8, 4
FUSED = {  # layer -> (sub-projections with their d_out, output groups: query groups, or None = one per rank)
    "qkv": ((("q_proj", 16), ("k_proj", 8), ("v_proj", 8)), 2),
    "gate_up": ((("gate_proj", 24), ("up_proj", 24)), None),
}
SLOT_IDS = [0, 2, -1, 1, 1, 0, 3, 2, 3, 0, -1, 2]  # slot 3's adapter skips the second sub-projection


def _adapters(mode: str, tp: int) -> list[tuple[int, int | None]]:
    """(rank, nblocks) per slot: the capacity, a lower rank, more blocks per rank (BD), a lower rank again."""
    bd = mode == "block_diagonal"
    return [(RANK, tp if bd else None), (RANK // 2, tp if bd else None), (RANK, 2 * tp if bd else None),
            (RANK // 2, tp if bd else None)]


def _factors(mode, proj, d_out, rank, nblocks, tp, seed):
    """Full stored A, B (PEFT layout) of one sub-projection's adapter, float64, and its plan."""
    from megatron_bdlora.sharding import ShardingPlan

    plan = ShardingPlan.build("column", mode, D_IN, d_out, rank, tp, nblocks)
    g = torch.Generator().manual_seed(seed * 100 + sum(map(ord, proj)))
    return plan, torch.randn(plan.a.full_shape, generator=g, dtype=torch.float64), torch.randn(
        plan.b.full_shape, generator=g, dtype=torch.float64
    )


def _layer(info, mode, projections, groups, dtype):
    from megatron_bdlora.config import LoRASettings
    from megatron_bdlora.layers import LoRALayerSpec, make_parallel_linear

    settings = LoRASettings(rank=RANK, alpha=2.0 * RANK, mode=mode, nblocks=info.tp_size if mode == "block_diagonal"
                            else None)
    spec = LoRALayerSpec(settings, projections, groups=groups, layer_name="fused", slots=SLOTS)
    return make_parallel_linear("column", D_IN, sum(d for _, d in projections), _config(info.tp_size, dtype), spec)


def _load(info, layers_of, mode, projections, seed):
    """Every slot's adapter into the layer holding each sub-projection (slot 3 skips the second one)."""
    for slot, (rank, nblocks) in enumerate(_adapters(mode, info.tp_size)):
        for i, (proj, d_out) in enumerate(projections):
            adapter = layers_of[proj].lora[proj]
            if slot == 3 and i == 1:
                adapter.clear_slot(slot)
                continue
            plan, a, b = _factors(mode, proj, d_out, rank, nblocks, info.tp_size, seed + slot)
            dtype = adapter.lora_A.dtype
            a_local, b_local = plan.a.shard(a, info.tp_rank).to(dtype), plan.b.shard(b, info.tp_rank).to(dtype)
            adapter.load_slot(slot, a_local, b_local, plan, 0.5 + slot)


def packed_worker(info, cases):
    """Per case: the fused layer's local output and the separate layers' local outputs, before and after a reload."""
    import megatron_bdlora.ops as ops

    dense_tokens, out = ops.DENSE_TOKENS, []
    for mode, name, dtype in cases:
        projections, groups = FUSED[name]
        fused = _layer(info, mode, projections, groups, dtype)
        separate = {proj: _layer(info, mode, ((proj, d),), None, dtype) for proj, d in projections}
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for layer in (fused, *separate.values()):
                layer.weight.zero_()  # outputs are the LoRA contributions alone
        x = torch.randn(len(SLOT_IDS), 1, D_IN, generator=g, dtype=torch.float64).to(dtype)  # [s, b, h]
        runs = []
        for seed in (0, 1):  # the second load lands in the slots after the first packed forward
            _load(info, {p: fused for p, _ in projections}, mode, projections, seed)
            _load(info, separate, mode, projections, seed)
            ys = {}
            with torch.no_grad():
                for key, layer in (("fused", fused), *separate.items()):
                    layer.set_lora_slots(torch.tensor(SLOT_IDS))
                    ys[key] = layer(x)[0].reshape(len(SLOT_IDS), -1)
                ops.DENSE_TOKENS = 0  # the fused layer as in a prefill step (collective-free: the segment branch)
                try:
                    ys["fused prefill"] = fused(x)[0].reshape(len(SLOT_IDS), -1)
                finally:
                    ops.DENSE_TOKENS = dense_tokens
            runs.append(ys)
        fused.to(torch.float16)  # a conversion gives every parameter its own storage: the layer packs them again there
        packed = fused._lora_a_packed[0]
        tied = all(ad.lora_A.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
                   for ad in fused.lora_adapters)
        out.append((runs, tied))
    return out


def _interleave(parts: list[torch.Tensor], groups: int) -> torch.Tensor:
    """Independent of the layer: the fused layout is, per output group, [proj0 | proj1 | ...]."""
    per_group = [p.reshape(p.shape[0], groups, -1) for p in parts]  # [n, groups, width / groups]
    return torch.cat(per_group, dim=-1).reshape(parts[0].shape[0], -1)


CASES = [(mode, name, torch.float64) for mode in MODES for name in FUSED] + [("block_diagonal", "qkv", torch.float32)]


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_fused_layer_equals_separate_projections(tp):
    per_rank = run_distributed(packed_worker, tp, CASES)
    for rank, results in enumerate(per_rank):
        for (mode, name, dtype), (runs, tied) in zip(CASES, results):
            assert tied, f"{name}/{mode}: after .to() the adapters' A stacks are no longer views of the packed stack"
            projections, groups = FUSED[name]
            local_groups = (groups or tp) // tp
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            for seed, ys in enumerate(runs):
                label = f"{name}/{mode}/{dtype}/tp{tp}/rank{rank}/load{seed}"
                want = _interleave([ys[p] for p, _ in projections], local_groups)
                assert want.abs().max() > 0.1, f"{label}: no LoRA output to compare"
                for step in ("fused", "fused prefill"):
                    got = ys[step]
                    err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
                    assert err <= tol, f"{label}/{step}: packed vs separate rel err {err:.3g}"
                    base_rows = [t for t, s in enumerate(SLOT_IDS) if s < 0]
                    assert not got[base_rows].any(), f"{label}/{step}: tokens without an adapter got a LoRA output"
            assert not torch.equal(runs[0]["fused"], runs[1]["fused"]), f"{name}/{mode}: the reload was not picked up"


def test_packed_ops_equal_each_slice_alone_in_float64_math(backend):
    """The ops themselves on both backends: three slices row-interleaved in one A stack (slot 1 of rank 2, slot 2
    holding only slices 0 and 2), their B stacks expanded into one fused output of 2 groups, z all-gathered from 2
    ranks; each slice checked against per-token float64 math (ops_reference), other columns untouched."""
    from ops_reference import check, poisoned_stack, reference_expand, reference_shrink

    from megatron_bdlora.lora_batch import ExpandSlice, FactorView, OutputLayout, SlotBatch, SlotViews
    from megatron_bdlora.ops import lora_expand_packed, lora_shrink_packed

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    slot_ids = [1, 0, -1, 2, 0, 1, 2, 0]
    batch = SlotBatch.from_slot_ids(torch.tensor(slot_ids, device=dev), 3)
    a_views = [SlotViews([FactorView(4, 16), FactorView(2, 16), None if p == 1 else FactorView(4, 16)])
               for p in range(3)]
    widths = (8, 4, 4)  # per group: q 8 columns, k 4, v 4 (B: [2 groups * width, 4 ranks * 2 chunks] per slot)
    b_views = [SlotViews([FactorView(2 * w, 8), FactorView(2 * w, 4), None if p == 1 else FactorView(2 * w, 8)])
               for p, w in enumerate(widths)]
    stacks = [poisoned_stack(v, (4, 16), torch.float32, p) for p, v in enumerate(a_views)]
    stacks[1][2] = 0  # a slice a slot does not hold has zero rows (LoRAAdapter.clear_slot); other unused rows stay NaN
    a = torch.stack(stacks, dim=2).flatten(1, 2).to(dev)  # [3 slots, 4 ranks * 3 slices, 16], rows interleaved
    b = [poisoned_stack(v, (2 * w, 8), torch.float32, 10 + p).to(dev) for p, (v, w) in enumerate(zip(b_views, widths))]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(slot_ids), 16, generator=g).to(dev)
    scalings = torch.tensor([0.5, 2.0, 1.5], device=dev)

    z = lora_shrink_packed(x, a, a_views, batch)  # [n, 12]: column j * 3 + p is slice p's rank row j
    for p in range(3):
        check(z[:, p::3].cpu(), reference_shrink(x.cpu(), stacks[p], a_views[p], slot_ids), torch.float32, f"z{p}")
    other = torch.randn(z.shape, generator=g).to(dev)  # the other rank's piece of the all-gather
    gathered = torch.cat([z, other], dim=-1)
    layouts = [OutputLayout(w, 16, off) for w, off in zip(widths, (0, 8, 12))]
    poison = torch.randn(len(slot_ids), 34, generator=g).to(dev)  # 32 fused columns, 2 nobody addresses
    out = poison.clone()
    lora_expand_packed(gathered, [ExpandSlice(b[p], b_views[p], scalings, layouts[p]) for p in range(3)], batch, out,
                       in_chunks=2)
    want = poison.double().cpu()
    for p in range(3):
        piece = torch.cat([z[:, p::3], other[:, p::3]], dim=-1).cpu()  # the slice's [n, 2 * 4] gathered rank space
        want = reference_expand(want, piece, b[p].cpu(), b_views[p], scalings.cpu(), slot_ids, layouts[p], 2)
    check(out.cpu(), want, torch.float32, "fused expand")
    assert torch.equal(out[:, 32:], poison[:, 32:]) and torch.equal(out[2], poison[2])


@pytest.mark.parametrize("onednn", [False, True], ids=["torch-matmul", "onednn"])
def test_dense_branch_equals_each_slice_alone_in_float64_math(onednn, monkeypatch):
    """The dense torch path (ops.lora_dense_branch): three slices whose slots differ in rank, block count
    (a BD A factor of 2 blocks) and coverage (slot 2 lacks slice 1), B rows at their fused-output columns of 2
    groups; each token gets its own slot's output in token order, tokens without an adapter and unaddressed columns
    stay bit-identical, the poisoned (NaN) parts of the stacks are never read, and a reload is picked up.
    onednn: the factors packed for oneDNN (as serving layers on CPU pack them) and used at this step's size."""
    from ops_reference import check, poisoned_stack, reference_expand, reference_shrink

    from megatron_bdlora import ops
    from megatron_bdlora.lora_batch import ExpandSlice, FactorView, OutputLayout, SlotBatch, SlotViews
    from megatron_bdlora.ops import dense_factors, lora_dense_branch, with_onednn_factors

    monkeypatch.setattr(ops, "ONEDNN_DENSE_TOKENS", 0)

    slot_ids = [1, 0, -1, 2, 0, 1, 2, 0]
    batch = SlotBatch.from_slot_ids(torch.tensor(slot_ids), 3)
    a_views = [SlotViews([FactorView(4, 8, 2), FactorView(2, 16), None if p == 1 else FactorView(4, 16)])
               for p in range(3)]
    widths = (8, 4, 4)
    b_views = [SlotViews([FactorView(2 * w, 4), FactorView(2 * w, 2), None if p == 1 else FactorView(2 * w, 4)])
               for p, w in enumerate(widths)]
    a = [poisoned_stack(v, (4, 16), torch.float32, p) for p, v in enumerate(a_views)]
    b = [poisoned_stack(v, (2 * w, 4), torch.float32, 10 + p) for p, (v, w) in enumerate(zip(b_views, widths))]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(slot_ids), 16, generator=g)
    scalings = torch.tensor([0.5, 2.0, 1.5])
    layouts = [OutputLayout(w, 16, off) for w, off in zip(widths, (0, 8, 12))]
    poison = torch.randn(len(slot_ids), 34, generator=g)  # 32 fused columns, 2 nobody addresses

    def expected() -> torch.Tensor:
        want = poison.double()
        for p in range(3):
            z = reference_shrink(x, a[p], a_views[p], slot_ids)  # [n, 4] in slot order
            want = reference_expand(want, z, b[p], b_views[p], scalings, slot_ids, layouts[p])
        return want

    def run() -> torch.Tensor:
        slices = [ExpandSlice(b[p], b_views[p], scalings, layouts[p]) for p in range(3)]
        factors = dense_factors(list(zip(a, a_views)), slices, (0, 1, 2), 16)
        if onednn:
            factors = with_onednn_factors(factors)
            assert factors.onednn is not None
        return lora_dense_branch(x, poison.clone(), factors, batch)

    out = run()
    check(out, expected(), torch.float32, "dense branch")
    assert torch.equal(out[:, 32:], poison[:, 32:]) and torch.equal(out[2], poison[2])
    a[0][1, :2] = torch.randn(2, 16, generator=g)  # slot 1 reloaded: new factors, new views (a new rank)
    a_views[0] = a_views[0].replace(1, FactorView(2, 16))
    check(run(), expected(), torch.float32, "dense branch after a reload")


@pytest.mark.parametrize("onednn", [False, True], ids=["torch-matmul", "onednn"])
@pytest.mark.parametrize("packed", [True, False], ids=["qkv-packed", "one-slice-bd-a"])
def test_segment_branch_equals_each_slice_alone_in_float64_math(packed, onednn):
    """The prefill torch path of collective-free layers (ops.lora_segment_branch), reading each prompt's rows in
    place: runs of adjacent tokens with one slot (a slot's runs not adjacent, tokens without an adapter between),
    slots differing in rank, block count (a BD B of 2 blocks; one slice: a BD A of 2 blocks) and coverage (slot 2
    lacks slice 1), B rows at their fused-output columns of 2 groups (one slice: contiguous columns); checked
    against per-token float64 math, tokens without an adapter, unaddressed columns and the poisoned (NaN) parts of
    the stacks untouched. onednn: slots of one block per factor through oneDNN-packed factors (as serving layers on
    CPU pack them), the others (slot 0's 2-block B) through torch."""
    from ops_reference import check, poisoned_stack, reference_expand, reference_shrink

    from megatron_bdlora.lora_batch import ExpandSlice, FactorView, OutputLayout, SlotBatch, SlotViews
    from megatron_bdlora.ops import lora_segment_branch, onednn_slot_factors

    slot_ids = [1, 1, 1, 0, 0, -1, -1, 2, 2, 2, 0, 0, 1, -1]
    batch = SlotBatch.from_slot_ids(torch.tensor(slot_ids), 3)
    slices = 3 if packed else 1
    a_first = FactorView(4, 16) if packed else FactorView(4, 8, 2)
    a_views = [SlotViews([a_first, FactorView(2, 16), None if p == 1 else FactorView(4, 16)]) for p in range(slices)]
    widths = (8, 4, 4)[:slices]
    b_views = [SlotViews([FactorView(2 * w, 2, 2), FactorView(2 * w, 2), None if p == 1 else FactorView(2 * w, 4)])
               for p, w in enumerate(widths)]
    a = [poisoned_stack(v, (4, 16), torch.float32, p) for p, v in enumerate(a_views)]
    if packed:
        a[1][2] = 0  # a slice a slot does not hold has zero rows (LoRAAdapter.clear_slot)
    a_packed = torch.stack(a, dim=2).flatten(1, 2)  # [3 slots, 4 ranks * P slices, 16], rows interleaved
    b = [poisoned_stack(v, (2 * w, 4), torch.float32, 10 + p) for p, (v, w) in enumerate(zip(b_views, widths))]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(slot_ids), 16, generator=g)
    scalings = torch.tensor([0.5, 2.0, 1.5])
    # packed: 2 groups [q 8 | k 4 | v 4]; one slice: one group, contiguous columns 8-23 (the addmm into them)
    layouts = [OutputLayout(w, 16, off) for w, off in zip(widths, (0, 8, 12))] if packed else [OutputLayout(16, 16, 8)]
    poison = torch.randn(len(slot_ids), 34, generator=g)  # (up to) 32 fused columns, 2 nobody addresses

    assert batch.token_runs == ((1, 0, 3), (0, 3, 5), (2, 7, 10), (0, 10, 12), (1, 12, 13))
    packed_slots = []
    expand = [ExpandSlice(b[p], b_views[p], scalings, layouts[p]) for p in range(slices)]

    def onednn_factors(slot):  # as a serving layer packs them (without its cache); records the slots it packed
        factors = onednn_slot_factors(a_packed, a_views, expand, slot)
        if factors is not None:
            packed_slots.append(slot)
        return factors

    out = lora_segment_branch(x, poison.clone(), a_packed, a_views, expand, batch, onednn_factors if onednn else None)
    assert sorted(set(packed_slots)) == ([1, 2] if onednn else [])
    want = poison.double()
    for p in range(slices):
        z = reference_shrink(x, a[p], a_views[p], slot_ids)  # [n, 4] in slot order
        want = reference_expand(want, z, b[p], b_views[p], scalings, slot_ids, layouts[p])
    check(out, want, torch.float32, "segment branch")
    assert torch.equal(out[:, 32:], poison[:, 32:])
    assert all(torch.equal(out[t], poison[t]) for t, s in enumerate(slot_ids) if s < 0)


def test_collective_free_branch_goes_dense_for_decode_and_short_prompts_over_few_adapters():
    """Decode-sized steps and prompts short next to the number of adapters take the dense branch (few large
    products); long prompts, or many adapters, take the segments (each prompt on its own slot only)."""
    from megatron_bdlora import ops
    from megatron_bdlora.lora_batch import SlotBatch

    def branch(prompt_slots: list[int], prompt_len: int) -> str:
        slot_ids = torch.tensor([s for s in prompt_slots for _ in range(prompt_len)])
        batch = SlotBatch.from_slot_ids(slot_ids, 16)
        return ops.collective_free_branch(torch.zeros(len(slot_ids), 4), batch)

    assert branch([0, 1, 2, 3, 0, 1, 2, 3], 1) == "dense"  # decode
    assert branch([0, 1, 2, 3, 0, 1, 2, 3], 32) == "dense"  # 4 adapters x 32-token prompts
    assert branch(list(range(16)), 32) == "segments"  # 16 adapters
    assert branch([0, 1, 2, 3], 512) == "segments"  # long prompts
