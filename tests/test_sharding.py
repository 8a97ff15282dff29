"""The sharding plan's shapes, slices and validation, and the packed <-> block-diagonal conversions."""

from __future__ import annotations

import pytest
import torch

from megatron_bdlora.config import LoRASettings
from megatron_bdlora.local_ranks import run_distributed
from megatron_bdlora.sharding import ShardingPlan, block_diagonal_to_packed, packed_to_block_diagonal


@pytest.mark.parametrize(
    "args, message",
    [
        (("column", "block_diagonal", 16, 24, 6, 2, 4), "rank=6 is not divisible by nblocks=4"),
        (("column", "block_diagonal", 16, 24, 8, 4, 6), "nblocks=6 is not a multiple of tp=4"),
        (("column", "block_diagonal", 16, 20, 8, 2, 8), "d_out=20 is not divisible by nblocks=8"),
        (("row", "block_diagonal", 12, 16, 8, 2, 8), "d_in=12 is not divisible by nblocks=8"),
        (("row", "slora", 16, 16, 6, 4, None), "rank=6 is not divisible by tp=4"),
        (("column", "dense", 16, 16, 8, 2, None), "unknown LoRA mode 'dense'"),
        (("column", "replicated", 16, 18, 8, 4, None), "d_out=18 is not divisible by tp=4"),
    ],
)
def test_bad_plans_are_rejected_naming_the_value(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ShardingPlan.build(*args)


def test_unknown_mode_in_settings_is_rejected():
    with pytest.raises(ValueError, match="unknown LoRA mode 'blockdiag'"):
        LoRASettings(mode="blockdiag")


def bad_layer_worker(info):
    """Constructing a LoRA layer with a bad configuration raises ValueError naming the value."""
    from megatron.core import ModelParallelConfig

    from megatron_bdlora.layers import LoRALayerSpec, make_parallel_linear

    cfg = ModelParallelConfig(
        tensor_model_parallel_size=2, use_cpu_initialization=True, gradient_accumulation_fusion=False
    )
    messages = []
    for kind, d_in, d_out, rank, nblocks in [("column", 16, 24, 6, 4), ("row", 16, 24, 8, 3), ("column", 16, 20, 8, 8)]:
        spec = LoRALayerSpec(LoRASettings(rank=rank, mode="block_diagonal", nblocks=nblocks), (("q_proj", d_out),))
        try:
            make_parallel_linear(kind, d_in, d_out, cfg, spec)
            messages.append(None)
        except ValueError as err:
            messages.append(str(err))
    return messages


@pytest.mark.multi_rank
def test_layer_construction_rejects_bad_configuration():
    messages = run_distributed(bad_layer_worker, 2)[0]
    assert "rank=6 is not divisible by nblocks=4" in messages[0]
    assert "nblocks=3 is not a multiple of tp=2" in messages[1]
    assert "d_out=20 is not divisible by nblocks=8" in messages[2]


@pytest.mark.parametrize(
    "kind, mode, tp",
    [(k, m, tp) for k in ("column", "row") for m in ("block_diagonal", "slora", "replicated") for tp in (1, 2, 4)],
)
def test_shards_cover_the_stored_factor_exactly_once(kind, mode, tp):
    plan = ShardingPlan.build(kind, mode, 32, 48, 8, tp, 8 if mode == "block_diagonal" else None)
    for shard in (plan.a, plan.b):
        full = torch.randn(shard.full_shape, dtype=torch.float64)
        pieces = [shard.shard(full, i) for i in range(tp)]
        assert all(tuple(p.shape) == shard.local_shape for p in pieces)
        assert torch.equal(shard.unshard(pieces), full)


def test_parameter_counts_match_the_closed_forms():
    d_in, d_out, r, n = 64, 96, 8, 4
    assert ShardingPlan.build("column", "replicated", d_in, d_out, r, n).num_parameters() == r * (d_in + d_out)
    assert ShardingPlan.build("column", "block_diagonal", d_in, d_out, r, n, n).num_parameters() == r * (
        d_in + d_out // n
    )
    assert ShardingPlan.build("row", "block_diagonal", d_in, d_out, r, n, n).num_parameters() == r * (d_in // n + d_out)


def test_packed_and_block_diagonal_layouts_round_trip_and_off_blocks_are_reported():
    packed = torch.randn(12, 2, dtype=torch.float64)  # (out, in / nblocks) with 3 blocks of (4, 2)
    dense = packed_to_block_diagonal(packed, 3)
    assert dense.shape == (12, 6)
    assert torch.equal(dense[4:8, 2:4], packed[4:8]) and torch.count_nonzero(dense[0:4, 2:6]) == 0
    assert torch.equal(block_diagonal_to_packed(dense, 3), packed)
    dense[9, 1] = 0.25  # block (2, 0): off the diagonal
    with pytest.raises(ValueError, match="largest off-block magnitude 0.25"):
        block_diagonal_to_packed(dense, 3, "B")
