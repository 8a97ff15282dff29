"""Megatron Column/RowParallelLinear with LoRA branches in any sharding mode (block_diagonal, slora, replicated).

The LoRA branch is added inside `_forward_impl`, i.e. on the rank's local input and before any output
collective of the base layer:
- row layers: the LoRA partial joins the base partial sum before the base layer's single all-reduce;
- column layers: the base layer's input-gradient all-reduce is moved to megatron's copy-to-region on the
  input, so base and LoRA input gradients are summed first and reduced once.

A fused column layer (qkv, gate/up) carries one adapter per sub-projection (as PEFT does); their outputs are
interleaved into megatron's fused layout in `groups` groups (query groups for qkv, 1 for [gate; up]).

Adapters are stacks of `slots` (training: 1); a serving engine selects a slot per token with
`set_lora_slots`, reusing the same sharding arithmetic. The layer's plan is the *capacity* of a slot; a
slot can hold any smaller adapter of the same mode (lower rank, more blocks per rank), loaded with
`load_slot` under that adapter's own plan and computed on its own slice of the slot (lora_batch.FactorView).
Serving runs a fused layer's sub-projections packed (ops.lora_shrink_packed / lora_expand_packed): one shrink
over their A stacks, which then share one storage (`packed_lora_a`), one collective, one expand into the fused
output, added in place into the base output.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import nn

from megatron_bdlora.collectives import all_gather_dim0, gather_rank_intermediates, sum_grad_over_tp
from megatron_bdlora.config import LoRASettings
from megatron_bdlora.frozen_linear import PACKED_DTYPES, frozen_forward_impl, is_packed
from megatron_bdlora.lora_batch import (
    DenseFactors,
    ExpandSlice,
    FactorView,
    GraphLaunch,
    OutputLayout,
    PackedSlotFactors,
    SlotBatch,
    SlotViews,
)
from megatron_bdlora.ops import (
    collective_free_branch,
    dense_factors,
    lora_dense_branch,
    lora_expand_packed,
    lora_segment_branch,
    lora_shrink_packed,
    matmul_packed,
    onednn_slot_factors,
    with_onednn_factors,
)
from megatron_bdlora.sharding import Collective, FactorShard, LayerKind, ShardingPlan, packed_to_block_diagonal


def init_lora_a(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """The full master A: kaiming-uniform (a=sqrt(5), PEFT's default) from a seeded CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound)


def adapter_seed(master_seed: int, name: str) -> int:
    """Stable per-adapter seed, independent of TP degree and process."""
    return zlib.crc32(f"{master_seed}/{name}".encode())


@functools.lru_cache(maxsize=1024)
def _table_row(view: FactorView | None) -> torch.Tensor:
    """A view's row of a slot table ([3] int32, as SlotViews.table), made once per distinct view."""
    return SlotViews([view]).table()[0]


class LoRAAdapter(nn.Module):
    """One sub-projection's adapter on one TP rank: slices of A and B as the plan dictates."""

    def __init__(
        self,
        plan: ShardingPlan,
        settings: LoRASettings,
        tp_rank: int,
        tp_group: torch.distributed.ProcessGroup,
        slots: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.tp_rank = tp_rank
        self.tp_group = tp_group
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.zeros(slots, *plan.a.local_shape, dtype=dtype))  # [slots, r?, in?]
        self.lora_B = nn.Parameter(torch.zeros(slots, *plan.b.local_shape, dtype=dtype))  # [slots, out?, r?]
        self.register_buffer("scaling", torch.full((slots,), settings.scaling, dtype=torch.float32))
        # per slot: the views of A and B of the adapter it holds (its scaling in `scaling`); None = nothing for this
        # layer. Replaced on every change, never mutated: a step caches its plan per instance, the kernels its table.
        self.a_views = SlotViews([self._views(plan)[0]] * slots)
        self.b_views = SlotViews([self._views(plan)[1]] * slots)
        # the same views as device tables at fixed addresses, rewritten in place (what CUDA-graph launches read)
        self.register_buffer("a_table", self.a_views.table().clone(), persistent=False)  # [slots, 3] int32
        self.register_buffer("b_table", self.b_views.table().clone(), persistent=False)
        self.graph_max_blocks: int | None = None  # set by enable_graph_launch (serving under CUDA graphs)
        for param, shard in ((self.lora_A, plan.a), (self.lora_B, plan.b)):
            # megatron's attributes: dim +1 because of the leading slot dim
            split = shard.split_dim is not None and plan.tp > 1
            set_tensor_model_parallel_attributes(param, split, (shard.split_dim or 0) + 1, 1)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """PEFT's init, TP-invariant: A sliced from one seeded full master tensor, B zero (slot 0; others empty)."""
        self.lora_A.zero_()
        self.lora_B.zero_()
        a_full = init_lora_a(self.plan.a.full_shape, seed)
        self.lora_A[0] = self.plan.a.shard(a_full, self.tp_rank).to(self.lora_A.dtype)

    def _factor(self, param: torch.Tensor, shard: FactorShard) -> torch.Tensor:
        return sum_grad_over_tp(param, self.tp_group) if shard.replicated else param

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_local] -> [..., r_local] (this rank's piece of A x, before any collective), slot 0 (training)."""
        a = self._factor(self.lora_A, self.plan.a)
        return matmul_packed(self.dropout(x), a[0], self.plan.a.local_blocks)

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        """[..., r] -> [..., out_local]: the scaled LoRA contribution to this rank's output (slice), slot 0."""
        b = self._factor(self.lora_B, self.plan.b)
        return matmul_packed(z * self.scaling[0], b[0], self.plan.b.local_blocks)

    def enable_graph_launch(self, max_blocks: int) -> None:
        """Size the kernels' launches for capture in CUDA graphs: any adapter of at most `max_blocks` local blocks
        per factor (checked at load) runs in the captured launch."""
        self.graph_max_blocks = max_blocks

    def graph_launch(self, table: torch.Tensor) -> GraphLaunch | None:
        """How the kernels launch on one of this adapter's factor stacks (None: sized by today's views)."""
        return None if self.graph_max_blocks is None else GraphLaunch(table, self.graph_max_blocks)

    @staticmethod
    def _views(plan: ShardingPlan) -> tuple[FactorView, FactorView]:
        """What a slot holding an adapter of this plan computes on: its local shapes and blocks."""
        a, b = plan.a, plan.b
        return FactorView(*a.local_shape, a.local_blocks), FactorView(*b.local_shape, b.local_blocks)

    @torch.no_grad()
    def load_slot(
        self, slot: int, a_local: torch.Tensor, b_local: torch.Tensor, plan: ShardingPlan, scaling: float
    ) -> None:
        """Put this rank's slices of an adapter with its own plan (rank, nblocks) into a slot (serving)."""
        cap = self.plan
        if (plan.kind, plan.mode, plan.d_in, plan.d_out, plan.tp) != (cap.kind, cap.mode, cap.d_in, cap.d_out, cap.tp):
            raise ValueError(f"adapter plan {plan} does not fit this layer's plan {cap}")
        views = self._views(plan)
        for param, local, view, name in ((self.lora_A, a_local, views[0], "A"), (self.lora_B, b_local, views[1], "B")):
            if self.graph_max_blocks is not None and view.blocks > self.graph_max_blocks:
                raise ValueError(
                    f"lora_{name} has {view.blocks} blocks on this rank; the CUDA graphs were captured for at most "
                    f"{self.graph_max_blocks} (serve with --cuda-graphs off, or train with fewer blocks per rank)"
                )
            if tuple(local.shape) != (view.rows, view.cols):
                raise ValueError(f"lora_{name} slice has shape {tuple(local.shape)}, expected {(view.rows, view.cols)}")
            if view.rows > param.shape[1] or view.cols > param.shape[2]:
                raise ValueError(
                    f"lora_{name} slice {(view.rows, view.cols)} exceeds the slot capacity {tuple(param.shape[1:])} "
                    f"(adapter rank {plan.rank} > the server's max LoRA rank {cap.rank}?)"
                )
        for param, local, view in ((self.lora_A, a_local, views[0]), (self.lora_B, b_local, views[1])):
            # written only once both factors passed: a refused adapter leaves the slot as it was; beyond the view
            # zeroed (what a smaller adapter leaves of a larger one is never read, but a cleared slot is all zeros)
            param[slot, : view.rows, : view.cols] = local
            if view.cols < param.shape[2]:
                param[slot, : view.rows, view.cols :] = 0
            if view.rows < param.shape[1]:
                param[slot, view.rows :] = 0
        self.scaling[slot] = scaling
        self._set_views(slot, views)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """The slot holds nothing for this layer (an adapter that does not target it, or none at all); its factors
        are zeroed, as a fused layer's packed shrink computes (and never reads) the rows of slices a slot lacks."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self._set_views(slot, (None, None))

    writes = 0  # slot writes in this process (any adapter): cached per-step forms of the slots are current while equal

    def _set_views(self, slot: int, views: tuple[FactorView | None, FactorView | None]) -> None:
        LoRAAdapter.writes += 1
        self.a_views = self.a_views.replace(slot, views[0])
        self.b_views = self.b_views.replace(slot, views[1])
        self.a_table[slot] = _table_row(views[0])  # in place: the address a captured graph reads
        self.b_table[slot] = _table_row(views[1])

    @torch.no_grad()
    def load_full_factors(
        self, a_full: torch.Tensor, b_full: torch.Tensor, slot: int = 0, scaling: float | None = None
    ) -> None:
        """Set a slot from the full stored forms (PEFT layout); each rank keeps its slice."""
        self.lora_A[slot] = self.plan.a.shard(a_full, self.tp_rank).to(self.lora_A.dtype)
        self.lora_B[slot] = self.plan.b.shard(b_full, self.tp_rank).to(self.lora_B.dtype)
        if scaling is not None:
            self.scaling[slot] = scaling
        self._set_views(slot, self._views(self.plan))

    @torch.no_grad()
    def gather_full_factors(self, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The full stored forms of A and B, assembled from every TP rank (collective)."""
        return tuple(  # type: ignore[return-value]
            shard.unshard(_all_gather_list(param[slot], self.tp_group))
            if shard.split_dim is not None
            else param[slot].clone()
            for param, shard in ((self.lora_A, self.plan.a), (self.lora_B, self.plan.b))
        )

    @torch.no_grad()
    def local_delta(self, slot: int = 0) -> torch.Tensor:
        """This rank's scaled dense weight update, shaped like the rank's slice of this sub-projection."""
        a, b = self.lora_A[slot], self.lora_B[slot]
        if self.plan.merge_gather == "A":
            a = all_gather_dim0(a, self.tp_group)
        elif self.plan.merge_gather == "B":
            b = all_gather_dim0(b, self.tp_group)
        a_dense = packed_to_block_diagonal(a, self.plan.a.local_blocks)
        b_dense = packed_to_block_diagonal(b, self.plan.b.local_blocks)
        return (b_dense.double() @ a_dense.double()) * self.scaling[slot].item()


def _all_gather_list(t: torch.Tensor, group: torch.distributed.ProcessGroup) -> list[torch.Tensor]:
    if group.size() == 1:
        return [t.clone()]
    out = [torch.empty_like(t) for _ in range(group.size())]
    torch.distributed.all_gather(out, t.contiguous(), group=group)
    return out


@dataclass(frozen=True)
class LoRALayerSpec:
    """What a parallel linear layer needs to carry adapters: settings, sub-projections, output grouping."""

    settings: LoRASettings
    projections: tuple[tuple[str, int], ...]  # (name, full d_out) of each sub-projection, in fused order
    # the fused output is `groups` groups, each [proj0 | proj1 | ...]: qkv has its query groups; None means one
    # group per TP rank, as megatron lays out [gate; up] (rank r holds [gate_r | up_r])
    groups: int | None = None
    layer_name: str = "layer"  # seeds the TP-invariant initialisation
    slots: int = 1
    freeze_base: bool = True


class LoRAParallelLinear:
    """A megatron parallel linear layer with LoRA adapters: the machinery both kinds share (the kind decides the plan).

    Mixed in ahead of Column/RowParallelLinear; `isinstance(m, LoRAParallelLinear)` finds every LoRA layer of a model.
    """

    kind: LayerKind
    calls_frozen_forward = True  # _forward_impl routes the base product through frozen_linear itself

    def _init_lora(self, spec: LoRALayerSpec, d_in: int) -> None:
        if self.config.sequence_parallel and self.kind is LayerKind.COLUMN:
            raise ValueError(
                "LoRA column layers need sequence_parallel=False (the LoRA input must be the full sequence)"
            )
        tp, tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        groups = tp if spec.groups is None else spec.groups
        if groups < 1 or groups % tp:
            raise ValueError(f"{spec.layer_name}: output groups={groups} not divisible by tp={tp}")
        self.lora_spec = spec
        self.lora_local_groups = groups // tp
        self.lora_merged = False
        self.lora_enabled = True
        self.lora_slots: SlotBatch | None = None
        nblocks = spec.settings.nblocks_for(tp)
        self.lora = nn.ModuleDict()
        # every sub-projection's local output width (untargeted ones contribute zeros to the fused output)
        self.lora_local_widths = {}
        for name, d_out in spec.projections:
            if d_out % groups:
                raise ValueError(f"{spec.layer_name}.{name}: d_out={d_out} not divisible into {groups} groups")
            self.lora_local_widths[name] = d_out // tp if self.kind is LayerKind.COLUMN else d_out
            if name not in spec.settings.targets:
                continue
            plan = ShardingPlan.build(self.kind, spec.settings.mode, d_in, d_out, spec.settings.rank, tp, nblocks)
            self.lora[name] = LoRAAdapter(
                plan, spec.settings, tp_rank, self.tp_group, spec.slots, self.config.params_dtype
            )
        if not len(self.lora):
            raise ValueError(f"{spec.layer_name}: none of {[n for n, _ in spec.projections]} is a LoRA target")
        self.lora_adapters = tuple(self.lora.values())  # (in the fused order; the serving path reads it per forward)
        self._lora_a_packed: tuple[torch.Tensor | None, list[int]] = (None, [])  # see packed_lora_a
        self._dense: tuple[tuple, DenseFactors] | None = None  # serving, decode-sized steps: see _dense_factors
        self._onednn_slots: dict[int, tuple[int, PackedSlotFactors | None]] = {}  # see _onednn_slot_factors
        self.lora_layouts = self._output_layouts()
        if spec.slots > 1 and len(self.lora_adapters) > 1:  # a serving layer: packed from the start (see packed_lora_a)
            self._tie_lora_a()
        self.reset_lora_parameters(spec.layer_name)
        if spec.freeze_base:
            for p in (self.weight, self.bias):
                if p is not None:
                    p.requires_grad_(False)

    def reset_lora_parameters(self, layer_name: str) -> None:
        """Re-draw every adapter from its own seed (`master seed / layer_name.proj`), the same at any TP."""
        for name, ad in self.lora.items():
            ad.reset_parameters(adapter_seed(self.lora_spec.settings.seed, f"{layer_name}.{name}"))

    def _output_layouts(self) -> dict[str, OutputLayout]:
        """Where each adapter's expand writes in this rank's output: its columns of the fused layout
        (per group [proj0 | proj1 | ...], as `_combine`), or a row S-LoRA rank's d_out/tp slice."""
        g = self.lora_local_groups
        group_stride = sum(self.lora_local_widths.values()) // g
        layouts, offset = {}, 0
        for name, width in self.lora_local_widths.items():
            if name in self.lora:
                plan = self.lora[name].plan
                if plan.output_is_slice:  # one group: the rank's slice of the full partial sum
                    rows = plan.b.local_shape[0]
                    layouts[name] = OutputLayout(rows, rows, self.lora[name].tp_rank * rows)
                else:
                    layouts[name] = OutputLayout(width // g, group_stride, offset)
            offset += width // g
        return layouts

    def set_lora_slots(self, slots: torch.Tensor | SlotBatch | None) -> None:
        """Per-token adapter slots for the next forwards: slot ids [tokens] (-1 = base only) or their
        grouping (built once per step and shared by all layers); None = slot 0 everywhere (training)."""
        if isinstance(slots, torch.Tensor):
            slots = SlotBatch.from_slot_ids(slots, self.lora_spec.slots)
        self.lora_slots = slots

    def _combine(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Interleave sub-projection outputs into the fused layout: per group, [proj0 | proj1 | ...].

        outputs[name]: [..., width of name]; untargeted sub-projections are filled with zeros.
        """
        if len(self.lora_local_widths) == 1:
            return next(iter(outputs.values()))
        like = next(iter(outputs.values()))
        outputs = [
            outputs[n] if n in outputs else like.new_zeros(*like.shape[:-1], w)
            for n, w in self.lora_local_widths.items()
        ]
        g = self.lora_local_groups
        grouped = [o.reshape(*o.shape[:-1], g, o.shape[-1] // g) for o in outputs]  # [..., g, out_s/g]
        fused = torch.cat(grouped, dim=-1)  # [..., g, sum out_s/g]
        return fused.reshape(*fused.shape[:-2], fused.shape[-2] * fused.shape[-1])

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's LoRA contribution (slot 0) to the base layer's local output (partial sum for row layers)."""
        adapters = list(self.lora.values())
        plan = adapters[0].plan
        zs = gather_rank_intermediates([ad.shrink(x) for ad in adapters], plan.collective, self.tp_group)
        y = self._combine({name: ad.expand(z) for (name, ad), z in zip(self.lora.items(), zs)})
        if plan.output_is_slice:  # row S-LoRA: place this rank's d_out/tp slice in the full partial
            width = y.shape[-1]
            y = F.pad(y, (adapters[0].tp_rank * width, (plan.tp - 1 - adapters[0].tp_rank) * width))
        return y

    @torch.no_grad()
    def add_lora_slots(self, x: torch.Tensor, base: torch.Tensor) -> None:
        """Serving: add every token's own adapter output into the base output in place (inference only): one shrink
        for all sub-projections (they share x), the plan's collective, one expand into the fused output."""
        batch = self.lora_slots
        out = base.view(-1, base.shape[-1])  # [tokens, out_local]
        x = x.reshape(-1, x.shape[-1])  # [tokens, in_local]
        adapters = self.lora_adapters
        plan = adapters[0].plan
        branch = collective_free_branch(x, batch) if plan.collective is Collective.NONE else None
        if branch == "dense":
            lora_dense_branch(x, out, self._dense_factors(batch, x.shape[1]), batch)
            return
        if branch == "segments":
            lora_segment_branch(x, out, self.packed_lora_a(), [ad.a_views for ad in adapters], self._expand_slices(),
                                batch, self._onednn_slot_factors if is_packed(self) and x.dtype in PACKED_DTYPES
                                else None)
            return
        z = lora_shrink_packed(x, self.packed_lora_a(), [ad.a_views for ad in adapters], batch,
                               [ad.graph_launch(ad.a_table) for ad in adapters])  # [tokens, P * r] in slot order
        z = gather_rank_intermediates([z], plan.collective, self.tp_group)[0]
        chunks = plan.tp if plan.collective is Collective.ALL_GATHER else 1
        lora_expand_packed(z, self._expand_slices(), batch, out, chunks)

    def _expand_slices(self) -> list[ExpandSlice]:
        return [ExpandSlice(ad.lora_B, ad.b_views, ad.scaling, self.lora_layouts[name], ad.graph_launch(ad.b_table))
                for name, ad in self.lora.items()]

    def _dense_factors(self, batch: SlotBatch, in_width: int) -> DenseFactors:
        """This step's used slots as DenseFactors, rebuilt only when they changed or a slot was written since (decode
        keeps both for many steps; the check is two comparisons per layer)."""
        key = (batch.used_slots, LoRAAdapter.writes)
        if self._dense is None or self._dense[0] != key:
            a_slices = [(ad.lora_A, ad.a_views) for ad in self.lora_adapters]
            factors = dense_factors(a_slices, self._expand_slices(), key[0], in_width)
            self._dense = key, with_onednn_factors(factors) if is_packed(self) else factors
        return self._dense[1]

    def _onednn_slot_factors(self, slot: int) -> PackedSlotFactors | None:
        """ops.onednn_slot_factors of a slot (long CPU steps), cached until the next slot write."""
        cached = self._onednn_slots.get(slot)
        if cached is None or cached[0] != LoRAAdapter.writes:
            factors = onednn_slot_factors(self.packed_lora_a(), [ad.a_views for ad in self.lora_adapters],
                                          self._expand_slices(), slot)
            cached = self._onednn_slots[slot] = (LoRAAdapter.writes, factors)
        return cached[1]

    def packed_lora_a(self) -> torch.Tensor:
        """[slots, P * R, C]: the P adapters' A stacks in one storage, rank rows interleaved (row j of adapter p at
        j * P + p), the weight of the packed shrink; their lora_A parameters are views of it (a load is seen at once,
        no per-step copy). Tied when a serving layer (slots > 1) is built or converted (.to(), .cuda()), outside any
        step or CUDA-graph capture; tied here should anything else have replaced them (an optimiser's flat buffer)."""
        adapters = self.lora_adapters
        if len(adapters) == 1:
            return adapters[0].lora_A
        packed, pointers = self._lora_a_packed
        if packed is None or [ad.lora_A.data_ptr() for ad in adapters] != pointers:
            packed = self._tie_lora_a()
        return packed

    def _tie_lora_a(self) -> torch.Tensor:
        adapters = self.lora_adapters
        with torch.no_grad(), torch.inference_mode(False):
            stacked = torch.stack([ad.lora_A.detach() for ad in adapters], dim=2)  # [slots, R, P, C]
            for p, ad in enumerate(adapters):
                ad.lora_A.data = stacked[:, :, p]  # [slots, R, C], strided: the same parameter, now a view
        packed = stacked.flatten(1, 2)  # [slots, R * P, C]
        self._lora_a_packed = (packed, [ad.lora_A.data_ptr() for ad in adapters])
        return packed

    def _apply(self, fn, recurse=True):  # nn.Module's conversions: each parameter gets storage of its own again
        super()._apply(fn, recurse)
        if self.lora_spec.slots > 1 and len(self.lora_adapters) > 1:
            self._tie_lora_a()
        self._dense, self._onednn_slots = None, {}  # per-step forms of the old storage
        return self

    def _forward_impl(self, input, weight, *args, **kwargs):  # `input`: megatron's signature
        # inference: the frozen-weight product without megatron's autograd Function (and, in megatron-core 0.16, a
        # deprecation warning per row-parallel call: RowParallelLinear passes tp_group=None); oneDNN on CPU
        base = frozen_forward_impl(self, super()._forward_impl, input, weight, *args, **kwargs)
        if self.lora_merged or not self.lora_enabled:
            return base
        if self.lora_slots is None:
            return base + self.lora_forward(input).to(base.dtype)
        if self.lora_slots.any_adapter:  # (else every token uses the base model: the same on every rank)
            self.add_lora_slots(input, base)
        return base

    @torch.no_grad()
    def lora_weight_delta(self, slot: int = 0) -> torch.Tensor:
        """This rank's scaled dense update to its base weight shard (float64)."""
        deltas = {name: ad.local_delta(slot).t() for name, ad in self.lora.items()}  # [in, out_s]
        return self._combine(deltas).t()  # rows of each sub-projection interleave like the outputs

    @torch.no_grad()
    def merge_lora(self, slot: int = 0) -> None:
        """Fold an adapter into the base weight shard (serving a single adapter at base-model cost)."""
        if self.lora_merged:
            raise RuntimeError("LoRA already merged")
        self.weight.add_(self.lora_weight_delta(slot).to(self.weight.dtype))
        self.lora_merged, self.lora_merged_slot = True, slot

    @torch.no_grad()
    def unmerge_lora(self) -> None:
        """Undo `merge_lora` (restores the base weight up to rounding)."""
        if not self.lora_merged:
            raise RuntimeError("LoRA is not merged")
        self.weight.sub_(self.lora_weight_delta(self.lora_merged_slot).to(self.weight.dtype))
        self.lora_merged = False


class LoRAColumnParallelLinear(LoRAParallelLinear, ColumnParallelLinear):
    """ColumnParallelLinear (q/k/v, gate/up) with LoRA; BD mode adds no communication at all."""

    kind = LayerKind.COLUMN

    def __init__(self, input_size: int, output_size: int, *, lora: LoRALayerSpec, **kwargs) -> None:
        super().__init__(input_size, output_size, **kwargs)
        if sum(d for _, d in lora.projections) != output_size:
            raise ValueError(f"{lora.layer_name}: sub-projection sizes {lora.projections} do not sum to {output_size}")
        # one input-gradient all-reduce for base + LoRA: forward() then routes the input through
        # copy_to_tensor_model_parallel_region instead of reducing inside the base matmul's backward
        self.allreduce_dgrad = False
        self._init_lora(lora, input_size)


class LoRARowParallelLinear(LoRAParallelLinear, RowParallelLinear):
    """RowParallelLinear (o, down) with LoRA; the LoRA partial rides the base layer's all-reduce."""

    kind = LayerKind.ROW

    def __init__(self, input_size: int, output_size: int, *, lora: LoRALayerSpec, **kwargs) -> None:
        super().__init__(input_size, output_size, **kwargs)
        if len(lora.projections) != 1 or lora.projections[0][1] != output_size:
            raise ValueError(
                f"{lora.layer_name}: a row layer takes one projection of d_out={output_size}, got {lora.projections}"
            )
        self._init_lora(lora, input_size)


def make_parallel_linear(
    kind: LayerKind | str,
    d_in: int,
    d_out: int,
    config,
    lora: LoRALayerSpec | None = None,
    init_method=None,
) -> ColumnParallelLinear | RowParallelLinear:
    """A stand-alone TP linear layer (no bias) of either kind, with or without LoRA (benchmarks, tests)."""
    kind = LayerKind(kind)
    init = init_method or (lambda w: torch.nn.init.normal_(w, std=0.02))
    common = dict(config=config, init_method=init, bias=False)
    if kind is LayerKind.COLUMN:
        cls = LoRAColumnParallelLinear if lora else ColumnParallelLinear
        extra = dict(gather_output=False)
    else:
        cls = LoRARowParallelLinear if lora else RowParallelLinear
        extra = dict(input_is_parallel=True, skip_bias_add=False)
    layer = cls(d_in, d_out, **common, **extra, **({"lora": lora} if lora else {}))
    if lora is None:
        layer.weight.requires_grad_(False)  # the frozen base a LoRA layer is compared against
    return layer
