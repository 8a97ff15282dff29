"""tools/cost_model.py: the collectives and LoRA bytes it charges each mode, worked out by hand from the shapes; its
line fit; its in-loop latency lookup; the direction of its predictions. (Its `measure` run spawns ranks for ~40 s
at TP=2: exercised by hand, with its output in docs/machine_tp*.json, not in the suite.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_bdlora.config import LoRASettings

ROOT = Path(__file__).resolve().parents[2]
D, FFN, HEADS, KV, LAYERS = 64, 96, 8, 4, 3
CONFIG = dict(
    hidden_size=D, intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=KV, num_hidden_layers=LAYERS
)


@pytest.fixture(scope="module")
def cm():
    from megatron_bdlora.bench import cost_model

    return cost_model


def test_slora_pays_an_all_gather_per_column_pair_and_an_all_reduce_per_row_layer_bd_none(cm):
    r, tp, n, es = 8, 2, 5, 4
    slora = cm.collectives_per_step(CONFIG, LoRASettings(rank=r, mode="slora"), tp, n, es)
    # per layer: qkv (3 adapters of local rank r/tp, all-gathered to r each), o (all-reduce of r), gate/up (2 adapters),
    # down
    per_layer = [
        ("all_gather", n * 3 * r * es),
        ("all_reduce", n * r * es),
        ("all_gather", n * 2 * r * es),
        ("all_reduce", n * r * es),
    ]
    assert sorted(slora) == sorted(per_layer * LAYERS)
    assert cm.collectives_per_step(CONFIG, LoRASettings(rank=r, nblocks=tp), tp, n, es) == []
    assert cm.collectives_per_step(CONFIG, LoRASettings(rank=r, mode="replicated"), tp, n, es) == []


def test_lora_bytes_follow_each_modes_local_shards(cm):
    r, tp, n, reads, es = 8, 2, 4, 3, 2
    only_q = ("q_proj",)  # column, d_in = D, d_out = HEADS * head_dim = D
    slora = cm.lora_work(CONFIG, LoRASettings(rank=r, mode="slora", targets=only_q), tp, n, reads, es)
    bd = cm.lora_work(CONFIG, LoRASettings(rank=2 * r, nblocks=tp, targets=only_q), tp, n, reads, es)
    # S-LoRA rank r: A rows r/tp of [r, D], B rows D/tp of [D, r]; BD rank 2r: A rows 2r/tp, B block [D/tp, 2r/tp]
    slora_factors = (r // tp) * D + (D // tp) * r
    bd_factors = (2 * r // tp) * D + (D // tp) * (2 * r // tp)
    activations = n * (D + D // tp)
    # every token reads its own adapter's factors `reads` times (the gathered BGMV path)
    assert slora == (
        LAYERS * es * (reads * n * slora_factors + 2 * activations),
        LAYERS * 2 * n * slora_factors,
        LAYERS,
    )
    assert bd == (LAYERS * es * (reads * n * bd_factors + 2 * activations), LAYERS * 2 * n * bd_factors, LAYERS)


def test_line_fit_recovers_latency_and_bandwidth(cm):
    alpha, beta = 40.0, 2.5  # us, GB/s
    points = [(b, alpha + b / (beta * 1e3)) for b in (64, 1024, 65536, 2**20)]
    got = cm.fit_line(points)
    assert got == pytest.approx((alpha, beta), rel=1e-6)


def test_predictions_grow_with_collective_latency_and_bd_issues_none(cm):
    machine = cm.PUBLISHED["a100-nvlink"]
    rows = cm.predict("llama-3.1-8b", 8, machine, [8], 16)
    assert {r["bd"] for r in rows} == {"2r", "4r", "matched"}
    assert all(r["bd_terms"]["collectives"] == 0 and r["slora_terms"]["collectives"] == 4 * 32 for r in rows)
    slow = cm.Machine(**{**cm.asdict(machine), "latency_us": {k: 3 * v for k, v in machine.latency_us.items()}})
    slower = cm.predict("llama-3.1-8b", 8, slow, [8], 16)
    assert all(b["predicted_ratio"] > a["predicted_ratio"] > 1 for a, b in zip(rows, slower))


def test_in_loop_latency_replaces_alpha_at_the_steps_segment_length(cm):
    isolated = cm.PUBLISHED["a100-nvlink"]
    table = ((100.0, 300.0), (10000.0, 1500.0))  # (segment us, us per added collective)
    looped = cm.Machine(**{**cm.asdict(isolated), "in_loop_latency_us": table})
    beta_us = 4096 / (isolated.bandwidth_gbs["all_gather"] * 1e3)
    assert looped.collective_us("all_gather", 4096) == pytest.approx(isolated.latency_us["all_gather"] + beta_us)
    # piecewise linear in log(segment): 1000 us is halfway between 100 and 10000; flat outside
    assert looped.collective_us("all_gather", 4096, 1000.0) == pytest.approx(900.0 + beta_us)
    assert looped.collective_us("all_gather", 4096, 10.0) == pytest.approx(300.0 + beta_us)
    assert looped.collective_us("all_gather", 4096, 1e6) == pytest.approx(1500.0 + beta_us)
    # a step's segment is its base step over the 2 base all-reduces per layer: 2 ms over 3 layers -> 333 us
    r, tp, n = 8, 2, 4
    slora = LoRASettings(rank=r, mode="slora")
    base_ms = 2.0
    step = cm.predict_step(CONFIG, slora, tp, n, looped, base_ms, 4)
    colls = cm.collectives_per_step(CONFIG, slora, tp, n, 4)
    want = sum(looped.collective_us(k, b, base_ms * 1e3 / (2 * LAYERS)) for k, b in colls) / 1e3
    assert step["collectives_ms"] == pytest.approx(want)
    assert step["collectives_ms"] > cm.predict_step(CONFIG, slora, tp, n, isolated, base_ms, 4)["collectives_ms"]
    assert (
        cm.predict_step(CONFIG, LoRASettings(rank=2 * r, nblocks=tp), tp, n, looped, base_ms, 4)["collectives_ms"] == 0
    )


def test_a_machine_json_of_another_version_is_refused_naming_the_missing_keys(cm, tmp_path):
    old = {
        k: v
        for k, v in cm.asdict(cm.PUBLISHED["a100-nvlink"]).items()
        if k not in ("factor_reads_per_token", "in_loop_latency_us")
    }
    path = tmp_path / "machine.json"
    path.write_text(json.dumps({"machine": old}))
    with pytest.raises(SystemExit, match=r"machine\.json: key 'machine' lacks \['factor_reads_per_token'\]"):
        cm.load_machine(str(path))
    path.write_text(json.dumps({"machine": old | {"factor_reads_per_token": 3.0}}))
    assert cm.load_machine(str(path)).in_loop_latency_us == ()  # a calibration without the in-loop table still loads
