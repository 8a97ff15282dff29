"""LoRA parallel layers vs a single-process dense float64 reference, at TP 1, 2 and 4, in every mode."""

from __future__ import annotations

import pytest
import torch

from megatron_bdlora.local_ranks import run_distributed

pytestmark = pytest.mark.multi_rank

MODES = ("block_diagonal", "slora", "replicated")
KINDS = ("column", "row")
# (d_in, d_out, rank, nblocks-or-None, seed): non-square layers, rank == nblocks (one row per block), several blocks
# per rank
SHAPES = [
    (16, 24, 4, None, 0),
    (24, 8, 8, None, 1),
    (32, 16, 8, 8, 2),
]


def _dense_block_diag(packed: torch.Tensor, nblocks: int) -> torch.Tensor:
    """Independent reference: the packed layout's block j maps input chunk j to output chunk j."""
    return torch.block_diag(*packed.chunk(nblocks, dim=0)) if nblocks > 1 else packed


def _case_tensors(kind, mode, d_in, d_out, rank, nblocks, tp, seed):
    """Full float64 tensors of one case: base weight, stored A/B (PEFT layout), input, output grad."""
    g = torch.Generator().manual_seed(1000 + seed)
    n = nblocks if mode == "block_diagonal" else 1
    bd_a = mode == "block_diagonal" and kind == "row"
    bd_b = mode == "block_diagonal" and kind == "column"
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(
        w=r(d_out, d_in) * 0.2,
        a=r(rank, d_in // n if bd_a else d_in) * 0.3,
        b=r(d_out, rank // n if bd_b else rank) * 0.3,
        x=r(3, 2, d_in),  # [s, b, h]
        dy=r(3, 2, d_out),
        n_a=n if bd_a else 1,
        n_b=n if bd_b else 1,
    )


def _config(tp: int, dtype=torch.float32):
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        params_dtype=dtype,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


def _spec(mode, rank, nblocks, d_out, alpha=6.0, rslora=False, seed=0):
    from megatron_bdlora.config import LoRASettings
    from megatron_bdlora.layers import LoRALayerSpec

    settings = LoRASettings(rank=rank, alpha=alpha, use_rslora=rslora, mode=mode, nblocks=nblocks, seed=seed)
    # one sub-projection; its name only has to be a LoRA target
    return LoRALayerSpec(settings, (("q_proj", d_out),), layer_name="test")


def _build(info, kind, mode, d_in, d_out, rank, nblocks, t, rslora=False):
    """A LoRA layer whose base shard and adapter come from the full float64 case tensors."""
    from megatron_bdlora.layers import make_parallel_linear

    nb = nblocks if mode == "block_diagonal" else None
    layer = make_parallel_linear(kind, d_in, d_out, _config(info.tp_size), _spec(mode, rank, nb, d_out, rslora=rslora))
    with torch.no_grad():
        dim = 0 if kind == "column" else 1
        layer.weight.copy_(t["w"].chunk(info.tp_size, dim=dim)[info.tp_rank].float())
        layer.lora["q_proj"].load_full_factors(t["a"].float(), t["b"].float())
    return layer


def _local_input(kind, t, info):
    x = t["x"].float()
    if kind == "row":
        x = x.chunk(info.tp_size, dim=-1)[info.tp_rank]
    dy = t["dy"].float()
    if kind == "column":
        dy = dy.chunk(info.tp_size, dim=-1)[info.tp_rank]
    return x.clone().requires_grad_(True), dy


def forward_backward_worker(info, cases):
    """Per case: local output, input grad and A/B grads of this rank."""
    out = []
    for kind, mode, d_in, d_out, rank, nblocks, seed, rslora in cases:
        nb = nblocks or info.tp_size
        t = _case_tensors(kind, mode, d_in, d_out, rank, nb, info.tp_size, seed)
        layer = _build(info, kind, mode, d_in, d_out, rank, nb, t, rslora)
        x, dy = _local_input(kind, t, info)
        y, _ = layer(x)
        y.backward(dy)
        ad = layer.lora["q_proj"]
        out.append(
            dict(y=y.detach(), dx=x.grad, da=ad.lora_A.grad[0], db=ad.lora_B.grad[0], base_grad=layer.weight.grad)
        )
    return out


def _reference(kind, mode, d_in, d_out, rank, nb, tp, seed, rslora):
    t = _case_tensors(kind, mode, d_in, d_out, rank, nb, tp, seed)
    a = t["a"].clone().requires_grad_(True)
    b = t["b"].clone().requires_grad_(True)
    x = t["x"].clone().requires_grad_(True)
    s = 6.0 / (rank**0.5 if rslora else rank)
    y = x @ t["w"].T + s * (x @ _dense_block_diag(a, t["n_a"]).T) @ _dense_block_diag(b, t["n_b"]).T
    y.backward(t["dy"])
    return dict(y=y.detach(), dx=x.grad, da=a.grad, db=b.grad)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _cases(tp):
    cases = []
    for kind in KINDS:
        for mode in MODES:
            for d_in, d_out, rank, nblocks, seed in SHAPES:
                if nblocks is not None and nblocks % tp:
                    continue
                cases.append((kind, mode, d_in, d_out, rank, nblocks, seed, seed == 1))
    return cases


def layer_worker(info, cases, counted_shape):
    """One spawn per TP degree for both tests below: forward/backward cases, and collectives (TP > 1)."""
    return dict(cases=forward_backward_worker(info, cases),
                collectives=collective_count_worker(info, *counted_shape) if counted_shape else None)


@pytest.fixture(scope="module")
def layer_runs():
    """tp -> every rank's layer_worker results, computed once per TP degree."""
    cache: dict[int, list] = {}

    def run(tp: int) -> list:
        if tp not in cache:
            cache[tp] = run_distributed(layer_worker, tp, _cases(tp), (16, 32, 8) if tp > 1 else None)
        return cache[tp]

    return run


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_forward_and_gradients_match_dense_float64_reference(layer_runs, tp):
    from megatron_bdlora.sharding import ShardingPlan

    cases = _cases(tp)
    per_rank = [r["cases"] for r in layer_runs(tp)]
    for i, (kind, mode, d_in, d_out, rank, nblocks, seed, rslora) in enumerate(cases):
        nb = nblocks or tp
        ref = _reference(kind, mode, d_in, d_out, rank, nb, tp, seed, rslora)
        res = [r[i] for r in per_rank]
        plan = ShardingPlan.build(kind, mode, d_in, d_out, rank, tp, nb if mode == "block_diagonal" else None)
        label = f"{kind}/{mode}/tp{tp}/{(d_in, d_out, rank, nb)}"
        assert all(r["base_grad"] is None for r in res), f"{label}: base weight must stay frozen"
        if kind == "column":
            y = torch.cat([r["y"] for r in res], dim=-1)
            dxs = [r["dx"] for r in res]  # input replicated: every rank holds the full gradient
        else:
            y = res[0]["y"]
            assert all(torch.equal(r["y"], y) for r in res), f"{label}: row outputs differ across ranks"
            dxs = [torch.cat([r["dx"] for r in res], dim=-1)]
        assert _rel(y, ref["y"]) <= 1e-5, f"{label}: output rel err {_rel(y, ref['y'])}"
        for dx in dxs:
            assert _rel(dx, ref["dx"]) <= 1e-5, f"{label}: input grad rel err {_rel(dx, ref['dx'])}"
        for name, shard in (("da", plan.a), ("db", plan.b)):
            grads = [r[name] for r in res]
            if shard.split_dim is None:  # replicated factor: every rank must hold the full, identical gradient
                full_grads = grads
            else:
                full_grads = [shard.unshard(grads)]
            for g in full_grads:
                assert _rel(g, ref[name]) <= 1e-5, f"{label}: {name} rel err {_rel(g, ref[name])}"


def collective_count_worker(info, d_in, d_out, rank):
    """Collectives in forward and backward of each layer kind: frozen megatron base vs each LoRA mode."""
    from megatron_bdlora.comm_count import count_collectives
    from megatron_bdlora.layers import make_parallel_linear

    results = {}
    for kind in KINDS:
        for mode in (None,) + MODES:
            cfg = _config(info.tp_size)
            layer = make_parallel_linear(kind, d_in, d_out, cfg, _spec(mode, rank, None, d_out) if mode else None)
            if mode:  # non-zero B so every path carries gradient
                with torch.no_grad():
                    layer.lora["q_proj"].lora_B.normal_()
            local_in = d_in if kind == "column" else d_in // info.tp_size
            x = torch.randn(3, 2, local_in, requires_grad=True)
            with count_collectives() as fwd:
                y, _ = layer(x)
            with count_collectives() as bwd:
                y.sum().backward()
            results[(kind, mode)] = (dict(fwd), dict(bwd))
    return results


@pytest.mark.parametrize("tp", [2, 4])
def test_collectives_added_by_each_mode(layer_runs, tp):
    results = [r["collectives"] for r in layer_runs(tp)]
    for res in results:
        for kind in KINDS:
            base_f, base_b = res[(kind, None)]
            # megatron's own: column all-reduces the input grad, row all-reduces the output
            assert base_f == ({} if kind == "column" else {"all_reduce": 1}), (kind, base_f)
            assert base_b == ({"all_reduce": 1} if kind == "column" else {}), (kind, base_b)
            bd_f, bd_b = res[(kind, "block_diagonal")]
            assert (bd_f, bd_b) == (base_f, base_b), f"{kind}: BD must add no collective: {bd_f} {bd_b}"
            rep_f, rep_b = res[(kind, "replicated")]
            assert rep_f == base_f, f"{kind}: replicated forward adds nothing: {rep_f}"
            assert rep_b == _plus(base_b, "all_reduce"), f"{kind}: replicated grad all-reduce: {rep_b}"
            sl_f, sl_b = res[(kind, "slora")]
            fwd_op, bwd_op = (
                ("all_gather_into_tensor", "reduce_scatter_tensor")
                if kind == "column"
                else ("all_reduce", "all_reduce")
            )
            assert sl_f == _plus(base_f, fwd_op), f"{kind}: slora forward: {sl_f}"
            assert sl_b == _plus(base_b, bwd_op), f"{kind}: slora backward: {sl_b}"


def _plus(counts: dict, op: str) -> dict:
    out = dict(counts)
    out[op] = out.get(op, 0) + 1
    return out


def train_steps_worker(info, kind, mode, nblocks, steps):
    """A few AdamW steps on fixed data; returns the gathered stored factors and the final output."""
    from megatron_bdlora.layers import make_parallel_linear

    d_in, d_out, rank = 16, 24, 4
    torch.manual_seed(7)  # base weight init: megatron draws the full master weight, then slices
    layer = make_parallel_linear(kind, d_in, d_out, _config(info.tp_size), _spec(mode, rank, nblocks, d_out, seed=11))
    ad = layer.lora["q_proj"]
    initial = ad.gather_full_factors()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(3)
    x_full = torch.randn(4, 2, d_in, generator=g)
    target = torch.randn(4, 2, d_out, generator=g)
    x = x_full if kind == "column" else x_full.chunk(info.tp_size, -1)[info.tp_rank]
    for _ in range(steps):
        y, _ = layer(x)
        y_full = _gather_last(y) if kind == "column" else y
        loss = ((y_full - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        y, _ = layer(x)
        y_full = _gather_last(y) if kind == "column" else y
    return dict(initial=initial, final=ad.gather_full_factors(), y=y_full, w=_gather_weight(layer, kind))


def _gather_last(t):
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(t)


def _gather_weight(layer, kind):
    from megatron.core import parallel_state

    from megatron_bdlora.collectives import all_gather_dim0

    w = layer.weight.detach()
    group = parallel_state.get_tensor_model_parallel_group()
    return all_gather_dim0(w, group) if kind == "column" else all_gather_dim0(w.t().contiguous(), group).t()


def tp_invariance_worker(info, cases):
    return [train_steps_worker(info, kind, mode, nblocks, 1) for kind, mode, nblocks in cases]


def test_tp_invariance_of_init_and_one_optimizer_step():
    cases = [(kind, mode, 2 if mode == "block_diagonal" else None) for kind in KINDS for mode in MODES]
    at_tp1 = run_distributed(tp_invariance_worker, 1, cases)[0]
    at_tp2 = run_distributed(tp_invariance_worker, 2, cases)
    for i, (kind, mode, _) in enumerate(cases):
        tp1, tp2 = at_tp1[i], [r[i] for r in at_tp2]
        for r in tp2:
            for f in range(2):
                assert torch.equal(r["initial"][f], tp1["initial"][f]), f"{kind}/{mode}: init differs across TP"
                assert _rel(r["final"][f], tp1["final"][f].double()) <= 1e-5, f"{kind}/{mode}: step differs"
        assert torch.equal(tp2[0]["w"], tp1["w"]), "base weights differ across TP"


def test_block_diagonal_structure_survives_training():
    """After several steps the layer still computes W + s * blockdiag(B) @ A exactly (no off-block leak)."""
    res = run_distributed(train_steps_worker, 2, "column", "block_diagonal", 4, 5)
    a, b = res[0]["final"]
    assert not torch.equal(b, torch.zeros_like(b)), "training did not move B"
    b_dense = _dense_block_diag(b.double(), 4)
    off = b_dense.clone()
    for j in range(4):
        off[j * 6 : (j + 1) * 6, j : j + 1] = 0
    assert off.abs().max().item() == 0.0
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 16, generator=g).double()
    want = x @ (res[0]["w"].double() + (6.0 / 4) * b_dense @ a.double()).T
    assert _rel(res[0]["y"], want) <= 1e-5


def merge_worker(info, cases):
    out = []
    for kind, mode in cases:
        torch.manual_seed(5)
        t = _case_tensors(kind, mode, 16, 24, 4, 2, info.tp_size, 4)
        layer = _build(info, kind, mode, 16, 24, 4, 2, t)
        x, _ = _local_input(kind, t, info)
        with torch.no_grad():
            w0 = layer.weight.clone()
            y0, _ = layer(x)
            layer.merge_lora()
            moved = (layer.weight - w0).abs().max().item()
            y1, _ = layer(x)
            layer.unmerge_lora()
            y2, _ = layer(x)
        out.append(
            dict(
                moved=moved,
                merged_err=_rel(y1, y0.double()),
                restore=(layer.weight - w0).abs().max().item(),
                unmerged_err=_rel(y2, y0.double()),
            )
        )
    return out


def test_merge_then_unmerge_restores_base_and_preserves_outputs():
    cases = [(k, m) for k in KINDS for m in MODES]
    for rank_results in run_distributed(merge_worker, 2, cases):
        for (kind, mode), r in zip(cases, rank_results):
            assert r["moved"] > 1e-3, f"{kind}/{mode}: merge did not change the weight"
            assert r["merged_err"] <= 1e-5, f"{kind}/{mode}: merged output differs {r['merged_err']}"
            assert r["restore"] <= 1e-6, f"{kind}/{mode}: unmerge left {r['restore']}"
            assert r["unmerged_err"] <= 1e-5


def slots_worker(info, cases):
    """Layers holding 3 adapters: each token uses the slot it names (-1: base only)."""
    from megatron_bdlora.layers import LoRALayerSpec, make_parallel_linear

    out = []
    for kind, mode in cases:
        per_slot = [_case_tensors(kind, mode, 16, 24, 4, 2, info.tp_size, 20 + s) for s in range(3)]
        spec = _spec(mode, 4, 2 if mode == "block_diagonal" else None, 24)
        spec = LoRALayerSpec(spec.settings, spec.projections, layer_name="test", slots=3)
        layer = make_parallel_linear(kind, 16, 24, _config(info.tp_size), spec)
        with torch.no_grad():
            dim = 0 if kind == "column" else 1
            layer.weight.copy_(per_slot[0]["w"].chunk(info.tp_size, dim=dim)[info.tp_rank].float())
            for s, t in enumerate(per_slot):
                layer.lora["q_proj"].load_full_factors(t["a"].float(), t["b"].float(), slot=s)
        x, _ = _local_input(kind, per_slot[0], info)  # [3, 2, in]: 6 tokens
        slot_ids = torch.tensor([0, 2, -1, 1, 1, 0])
        layer.set_lora_slots(slot_ids)
        with torch.no_grad():
            y, _ = layer(x)
        out.append(y)
    return out


def test_per_token_adapter_slots_match_each_adapter_alone():
    cases = [(k, m) for k in KINDS for m in MODES]
    results = run_distributed(slots_worker, 2, cases)
    slot_ids = [0, 2, -1, 1, 1, 0]
    for i, (kind, mode) in enumerate(cases):
        y = torch.cat([r[i] for r in results], dim=-1) if kind == "column" else results[0][i]
        per_slot = [_case_tensors(kind, mode, 16, 24, 4, 2, 2, 20 + s) for s in range(3)]
        x = per_slot[0]["x"].reshape(6, 16)
        for tok, slot in enumerate(slot_ids):
            t = per_slot[max(slot, 0)]
            want = x[tok] @ per_slot[0]["w"].T
            if slot >= 0:
                want = (
                    want
                    + 1.5 * (x[tok] @ _dense_block_diag(t["a"], t["n_a"]).T) @ _dense_block_diag(t["b"], t["n_b"]).T
                )
            got = y.reshape(6, 24)[tok]
            assert _rel(got, want) <= 1e-5, f"{kind}/{mode}: token {tok} (slot {slot}) rel err {_rel(got, want)}"
