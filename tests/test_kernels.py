"""The Triton kernels' own knobs, beyond the shared ops suite (test_ops.py): split-K with atomic float32 sums, several
token and output tiles per slot, and bf16 (GPU only: Triton's interpreter computes bf16 tl.dot wrongly, so on CPU
bf16 cannot be checked at all). On CPU the kernels run in Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch
from ops_reference import check, poisoned_stack, reference_expand, reference_shrink

from megatron_bdlora.lora_batch import FactorView, OutputLayout, SlotBatch, SlotViews

ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def kernels():
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined: they then run in the interpreter
    from megatron_bdlora import kernels

    return kernels


def _case(dtype, device, seed=0):
    views_a = SlotViews([FactorView(32, 48), FactorView(24, 12, 4), FactorView(8, 48), FactorView(32, 48)])
    views_b = SlotViews([FactorView(40, 32), FactorView(40, 12, 2), FactorView(40, 8), FactorView(40, 32)])
    slot_ids = [0] * 19 + [2, -1, 1, 1] + [0] * 3 + [1] * 17  # slot 3 idle
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(slot_ids), 48, generator=g).to(dtype)
    a, b = poisoned_stack(views_a, (32, 48), dtype, seed + 1), poisoned_stack(views_b, (40, 32), dtype, seed + 2)
    scalings = torch.tensor([0.5, 2.0, 1.25, 4.0])
    batch = SlotBatch.from_slot_ids(torch.tensor(slot_ids, device=device), 4)
    return views_a, views_b, slot_ids, x.to(device), a.to(device), b.to(device), scalings.to(device), batch


@pytest.mark.parametrize("split_k,fixed_grid", [(1, True), (3, False)])
def test_split_k_and_small_tiles_match_float64(kernels, split_k, fixed_grid):
    """Token tiles of 16 (slots of 19 and 22 tokens span two), output tiles of 16 (rank 32 spans two, a 6-row
    block of a 4-block factor gets one each), K tiles of 16 split three ways with atomic float32 sums; the
    GPU's fixed grid (programs of idle slots and tiles past a slot's tokens exit) and the interpreter's compact one."""
    device = "cuda" if ON_GPU else "cpu"
    views_a, views_b, slot_ids, x, a, b, scalings, batch = _case(torch.float32, device)
    tiles = dict(block_m=16, block_n=16, block_k=16, fixed_grid=fixed_grid)
    z = kernels.shrink(x, a, views_a, batch, split_k=split_k, **tiles)
    check(z.cpu(), reference_shrink(x.cpu(), a.cpu(), views_a, slot_ids), torch.float32, f"shrink split_k={split_k}")
    poison = torch.randn(len(slot_ids), 40, generator=torch.Generator().manual_seed(9)).to(device)
    out = poison.clone()
    layout = OutputLayout.contiguous(40)
    kernels.expand(z, b, views_b, scalings, batch, out, layout, **tiles)
    want = reference_expand(poison.cpu(), z.cpu(), b.cpu(), views_b, scalings.cpu(), slot_ids, layout)
    check(out.cpu(), want, torch.float32, "expand")
    assert torch.equal(out[20], poison[20])  # the token without an adapter


def test_graph_launch_serves_adapters_loaded_after_its_sizing(kernels):
    """A CUDA graph replays the launch of its capture; adapters are loaded later. The graph launch is sized for the
    stacks' capacity and reads a slot table at a fixed address: launch arguments made while every slot was empty
    (as at capture), then the table rewritten in place with mixed ranks and block counts, give the float64 result."""
    from megatron_bdlora.lora_batch import GraphLaunch

    device = "cuda" if ON_GPU else "cpu"
    views_a, views_b, slot_ids, x, a, b, scalings, batch = _case(torch.float32, device, seed=7)
    empty = SlotViews([None] * 4)
    table_a, table_b = empty.table(device).clone(), empty.table(device).clone()
    graph_a, graph_b = GraphLaunch(table_a, max_blocks=4), GraphLaunch(table_b, max_blocks=4)  # "captured"
    z_empty = kernels.shrink(x, a, empty, batch, graph=graph_a)
    assert not z_empty.any()  # every slot empty: nothing computed
    table_a.copy_(views_a.table(device))  # the loads, in place
    table_b.copy_(views_b.table(device))
    z = kernels.shrink(x, a, empty, batch, graph=graph_a)  # today's views are not read: the table is
    check(z.cpu(), reference_shrink(x.cpu(), a.cpu(), views_a, slot_ids), torch.float32, "graph shrink")
    poison = torch.randn(len(slot_ids), 40, generator=torch.Generator().manual_seed(3)).to(device)
    out = poison.clone()
    layout = OutputLayout.contiguous(40)
    kernels.expand(z, b, empty, scalings, batch, out, layout, graph=graph_b)
    want = reference_expand(poison.cpu(), z.cpu(), b.cpu(), views_b, scalings.cpu(), slot_ids, layout)
    check(out.cpu(), want, torch.float32, "graph expand")
    assert torch.equal(out[20], poison[20])  # the token without an adapter


class _CountingKernel:
    """Stands in for a Triton kernel in `launch`: records each launch, then runs the kernel."""

    def __init__(self, kernel, launches: list[str], name: str) -> None:
        self.kernel, self.launches, self.name = kernel, launches, name

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


def test_packed_shrink_and_expand_are_one_launch_each_and_read_the_slices_tables_under_graphs(kernels, monkeypatch):
    """q/k/v in one shrink and one expand launch: the row-interleaved A stack of 3 slices (slot 1 of a lower rank,
    slot 2 holding only slices 0 and 2) computed as one projection, then every slice's B added into its columns of
    a fused output of 2 groups [q 8 | k 4 | v 4] at once; with today's views and, as in a captured CUDA graph, with
    the slices' slot tables written after the launches were sized (every slot empty then); against float64."""
    from megatron_bdlora.kernels import launch
    from megatron_bdlora.lora_batch import ExpandSlice, GraphLaunch

    device = "cuda" if ON_GPU else "cpu"
    slot_ids = [1, 0, -1, 2, 0, 1, 2, 0]
    batch = SlotBatch.from_slot_ids(torch.tensor(slot_ids, device=device), 3)
    views = [SlotViews([FactorView(4, 16), FactorView(2, 16), None if p == 1 else FactorView(4, 16)]) for p in range(3)]
    stacks = [poisoned_stack(v, (4, 16), torch.float32, p) for p, v in enumerate(views)]
    stacks[1][2] = 0  # a slice a slot does not hold has zero rows (LoRAAdapter.clear_slot)
    a = torch.stack(stacks, dim=2).flatten(1, 2).to(device)  # [3 slots, 4 ranks * 3 slices, 16]
    widths = (8, 4, 4)
    b_views = [SlotViews([FactorView(2 * w, 4), FactorView(2 * w, 2), None if p == 1 else FactorView(2 * w, 4)])
               for p, w in enumerate(widths)]
    b = [poisoned_stack(v, (2 * w, 4), torch.float32, 10 + p) for p, (v, w) in enumerate(zip(b_views, widths))]
    layouts = [OutputLayout(w, 16, off) for w, off in zip(widths, (0, 8, 12))]
    scalings = torch.tensor([0.5, 2.0, 1.5], device=device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(len(slot_ids), 16, generator=g).to(device)
    poison = torch.randn(len(slot_ids), 34, generator=g).to(device)  # 32 fused columns, 2 nobody addresses
    launches: list[str] = []
    for name, label in (("lora_shrink_kernel", "shrink"), ("lora_expand_kernel", "expand")):
        monkeypatch.setattr(launch, name, _CountingKernel(getattr(launch, name), launches, label))

    empty = SlotViews([None] * 3)
    a_tables = [empty.table(device).clone() for _ in range(3)]
    b_tables = [empty.table(device).clone() for _ in range(3)]
    a_graphs = [GraphLaunch(t, max_blocks=1) for t in a_tables]
    b_graphs = [GraphLaunch(t, max_blocks=1) for t in b_tables]

    def slices(b_slot_views, graphs):
        return [ExpandSlice(b[p].to(device), b_slot_views[p], scalings, layouts[p], graphs[p]) for p in range(3)]

    z_empty = kernels.shrink_packed(x, a, [empty] * 3, batch, graphs=a_graphs)  # "captured": all slots empty
    assert not z_empty.any()
    assert torch.equal(kernels.expand_packed(z_empty, slices([empty] * 3, b_graphs), batch, poison.clone()), poison)
    for table, v in zip(a_tables + b_tables, views + b_views):
        table.copy_(v.table(device))  # the loads, in place
    launches.clear()
    for label, z, expand_slices in (
        ("views", kernels.shrink_packed(x, a, views, batch), slices(b_views, [None] * 3)),
        ("graph tables", kernels.shrink_packed(x, a, [empty] * 3, batch, graphs=a_graphs),
         slices([empty] * 3, b_graphs)),
    ):
        for p in range(3):
            want = reference_shrink(x.cpu(), stacks[p], views[p], slot_ids)
            check(z[:, p::3].cpu(), want, torch.float32, f"packed shrink ({label}), slice {p}")
        out = kernels.expand_packed(z, expand_slices, batch, poison.clone())
        want = poison.cpu().double()
        for p in range(3):
            want = reference_expand(want, z[:, p::3].cpu(), b[p], b_views[p], scalings.cpu(), slot_ids, layouts[p])
        check(out.cpu(), want, torch.float32, f"packed expand ({label})")
        assert torch.equal(out[:, 32:], poison[:, 32:]) and torch.equal(out[2], poison[2])
    assert launches == ["shrink", "shrink", "expand", "expand"]  # one launch per call, whatever the slices


def test_layer_tables_follow_loads_in_place():
    """What a captured graph reads: a LoRA layer's slot tables keep their address across loads and clears and
    always equal its views; an adapter with more blocks than the graphs were sized for is refused, slot untouched."""
    from megatron_bdlora.config import LoRASettings
    from megatron_bdlora.layers import LoRAAdapter
    from megatron_bdlora.sharding import ShardingPlan

    cap = ShardingPlan.build("column", "block_diagonal", 32, 48, 16, 1, 1)
    adapter = LoRAAdapter(cap, LoRASettings(rank=16, nblocks=1), 0, None, slots=3)
    address = adapter.b_table.data_ptr()
    plan = ShardingPlan.build("column", "block_diagonal", 32, 48, 8, 1, 2)
    a, b = torch.randn(plan.a.local_shape), torch.randn(plan.b.local_shape)
    adapter.load_slot(1, a, b, plan, 2.0)
    adapter.clear_slot(2)
    assert adapter.b_table.data_ptr() == address
    assert torch.equal(adapter.a_table, adapter.a_views.table()) and torch.equal(
        adapter.b_table, adapter.b_views.table()
    )
    assert adapter.b_table[1].tolist() == [48, 4, 2] and adapter.b_table[2, 0] == 0
    adapter.enable_graph_launch(max_blocks=1)
    before = adapter.lora_B[0].clone()
    with pytest.raises(ValueError, match="CUDA graphs were captured for at most 1"):
        adapter.load_slot(0, a, b, plan, 2.0)
    assert torch.equal(adapter.lora_B[0], before) and adapter.b_table[0].tolist() == [48, 16, 1]


@pytest.mark.skipif(not ON_GPU, reason="bf16 needs a GPU: Triton's interpreter computes bf16 tl.dot wrongly")
def test_bf16_on_gpu_matches_float64(kernels):
    views_a, views_b, slot_ids, x, a, b, scalings, batch = _case(torch.bfloat16, "cuda", seed=4)
    z = kernels.shrink(x, a, views_a, batch, split_k=1)
    # bf16 keeps 8 bits of mantissa: unit roundoff 2**-8 ~ 3.9e-3 per stored z / out element
    tol = 8e-3
    want_z = reference_shrink(x.cpu(), a.cpu(), views_a, slot_ids)
    assert (z.cpu().double() - want_z).abs().max() <= tol * want_z.abs().max()
    out = torch.zeros(len(slot_ids), 40, dtype=torch.bfloat16, device="cuda")
    kernels.expand(z, b, views_b, scalings, batch, out, OutputLayout.contiguous(40))
    want = reference_expand(
        torch.zeros(len(slot_ids), 40), z.cpu(), b.cpu(), views_b, scalings.cpu(), slot_ids, OutputLayout.contiguous(40)
    )
    assert (out.cpu().double() - want).abs().max() <= tol * want.abs().max()


def test_the_repository_root_shadows_no_installed_distribution():
    """Every command run from the repository root has it first on sys.path, so a package or module there hides an
    installed one of the same name: a top-level kernels/ folder once hid Hugging Face's `kernels` (imported by
    transformers >= 5.25), and `from transformers import LlamaConfig` failed for make test, make demo and torchrun.
    Folders without __init__.py are namespace portions, which an installed regular package outranks."""
    from importlib.metadata import packages_distributions
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    importable = {p.stem for p in root.iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py"}
    shadowed = sorted(name for name in importable - {"megatron_bdlora"} if name in packages_distributions())
    assert not shadowed, f"{root} holds {shadowed}, which hide the installed packages of those names"


def test_kernels_compile_for_a_cuda_target_without_a_gpu():
    """Triton's compiler (with its bundled ptxas) builds every kernel variant serving uses for sm_90: what the
    interpreter cannot reject (tuples of pointers, structured exits, constexpr branches) is checked on CPU too."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("kernel_compile.py")
    done = subprocess.run([sys.executable, str(script), "90"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("chars of PTX") == 10, done.stdout
