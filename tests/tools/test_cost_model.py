"""tools/cost_model.py: the collectives and LoRA bytes it charges each mode, worked out by hand from the shapes; its
line fit; its in-loop latency lookup; the direction of its predictions; `validate`'s trivial predictors and its
"predictive" verdict on hand-made benchmark results. (Its `measure` run spawns ranks for ~40 s at TP=2: exercised
by hand, with its output in docs/machine_tp*.json, not in the suite.)"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from tool_module import load_tool

from megatron_bdlora.config import LoRASettings

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


# ---------------------------------------------------------------------------------- validate's trivial predictors

VOCAB, TOKENS, R = 100, 4, 8
SHAPES = {  # name: (d_in, d_out, is_row) of CONFIG: head_dim 64 / 8 = 8, so k and v are 4 x 8 = 32 wide
    "q_proj": (D, D, False), "k_proj": (D, 32, False), "v_proj": (D, 32, False), "o_proj": (D, D, True),
    "gate_proj": (D, FFN, False), "up_proj": (D, FFN, False), "down_proj": (FFN, D, True),
}


def _slora_factors(tp: int) -> int:
    """One rank's LoRA elements of rank R in S-LoRA mode, a layer: both factors split over the TP ranks."""
    return sum(R * (d_in + d_out) // tp for d_in, d_out, _ in SHAPES.values())


def _bd_factors(tp: int, rank: int) -> int:
    """One rank's BD elements, a layer: column A [rank/N, d_in], B [d_out/N, rank/N]; row A [rank/N, d_in/N],
    B [d_out, rank/N]."""
    n = rank // tp
    return sum(n * d_in // tp + d_out * n if row else n * d_in + d_out // tp * n
               for d_in, d_out, row in SHAPES.values())


def _bench(tp: int, steps: dict[str, list[float]], title: str = "hand-made") -> dict:
    """A bench_serving result of CONFIG with BD 2R against S-LoRA R: decode-step p50 per repeat per system."""
    systems = {name: dict(label=name, metrics=dict(decode_step_ms_p50=statistics.median(ms)),
                          per_repeat=[dict(decode_step_ms_p50=m) for m in ms]) for name, ms in steps.items()}
    served = dict(bd_2r=dict(mode="block_diagonal", variant="bd_2r"), slora=dict(mode="slora", variant="lora"),
                  none=dict(mode="block_diagonal", variant=None))
    return dict(title=title, systems=systems, config=dict(
        base_hf_config=CONFIG | dict(vocab_size=VOCAB), tp=tp, max_num_seqs=TOKENS, num_requests=TOKENS,
        num_adapters=2, systems_served=served,
        adapter_settings=dict(lora=dict(rank=R, alpha=2.0 * R, nblocks=None),
                              bd_2r=dict(rank=2 * R, alpha=4.0 * R, nblocks=tp))))


def test_trivial_predictors_are_the_constant_one_and_the_no_adapter_step_scaled_by_flop_share(cm):
    tp = 2
    steps = dict(bd_2r=[10.0, 12.0, 11.0], slora=[13.0, 12.0, 14.0], none=[9.0, 9.5, 10.0])
    (row,) = cm.validate(_bench(tp, steps), cm.PUBLISHED["a100-nvlink"], "decode_step_ms_p50")
    measured = 13.0 / 11.0  # S-LoRA's median step over BD's
    assert row["measured_ratio"] == pytest.approx(measured)
    assert row["measured_ratio_repeats"] == pytest.approx([13 / 10, 12 / 12, 14 / 11])  # repeat by repeat
    assert row["trivial"]["constant"] == pytest.approx(dict(predicted_ratio=1.0, error=1.0 / measured - 1))
    # base FLOPs of a rank: 2 per weight per token, the layers' weights and the LM head split over TP
    weights = LAYERS * sum(d_in * d_out for d_in, d_out, _ in SHAPES.values()) + VOCAB * D
    base = 2 * TOKENS * weights / tp
    slora_step = 9.5 * (1 + 2 * TOKENS * LAYERS * _slora_factors(tp) / base)
    bd_step = 9.5 * (1 + 2 * TOKENS * LAYERS * _bd_factors(tp, 2 * R) / base)
    want = slora_step / bd_step
    assert want != pytest.approx(1.0, abs=1e-3)  # the FLOP share moves the ratio: not the constant in disguise
    assert row["trivial"]["flop_share"] == pytest.approx(dict(predicted_ratio=want, error=want / measured - 1))
    assert row["beats_trivial"] is (abs(row["error"]) < min(abs(1 / measured - 1), abs(want / measured - 1)))


@pytest.fixture(scope="module")
def cli():
    return load_tool("cost_model")


def _validate(cli, tmp_path: Path, benches: list[dict]) -> dict:
    """tools/cost_model.py validate over the hand-made results (the published A100 machine), its JSON read back."""
    argv = ["validate", "--statistic", "decode_step_ms_p50", "--json", str(tmp_path / "out.json")]
    for i, bench in enumerate(benches):
        (tmp_path / f"run{i}.json").write_text(json.dumps(bench))
        argv += ["--bench", str(tmp_path / f"run{i}.json"), "--machine", "a100-nvlink"]
    cli.main(argv)
    return json.loads((tmp_path / "out.json").read_text())


def test_the_model_is_called_predictive_only_where_it_beats_both_trivial_predictors(cm, cli, tmp_path, capsys):
    none = [1.0]  # a 1 ms floor: S-LoRA's 12 collectives of ~15 us move the model well away from 1.0
    (probe,) = cm.validate(_bench(2, dict(bd_2r=[1.0], slora=[1.0], none=none)), cm.PUBLISHED["a100-nvlink"],
                           "decode_step_ms_p50")
    model, flops = probe["predicted_ratio"], probe["trivial"]["flop_share"]["predicted_ratio"]
    # the model's prediction depends on the floor alone, not on BD's step; no two predictors tie below
    assert model > 1.05 and abs(flops - model) > 0.05 and abs(flops - 1) > 0.05
    # X: measured exactly what the model predicts; Y: exactly 1.0; Z: one run of each, the same title
    exact, one = dict(bd_2r=[1.0], slora=[model], none=none), dict(bd_2r=[1.0], slora=[1.0], none=none)
    out = _validate(cli, tmp_path, [_bench(2, exact, "X"), _bench(2, one, "Y"), _bench(2, exact, "Z"),
                                    _bench(2, one, "Z")])
    assert [r["beats_trivial"] for r in out["rows"]] == [True, False, True, False]
    verdicts = {v["configuration"]: v for v in out["configurations"]}
    assert list(verdicts) == ["X", "Y", "Z"] and verdicts["Z"]["runs"] == ["run2.json", "run3.json"]
    # Z's mean |error| per predictor over its two runs (measured `model`, then 1.0), from the definitions
    z = dict(model=(0 + (model - 1)) / 2, constant=(abs(1 / model - 1) + 0) / 2,
             flop_share=(abs(flops / model - 1) + abs(flops - 1)) / 2)
    assert verdicts["Z"]["mean_abs_error"] == pytest.approx(z)
    assert verdicts["X"]["predictive"] and not verdicts["Y"]["predictive"]
    # for model > 1 its error at 1.0 (model - 1) exceeds the constant's at `model` (1 - 1/model): it loses on average
    assert z["model"] > z["constant"] and verdicts["Z"]["predictive"] is False
    printed = capsys.readouterr().out
    assert "predictive (mean |error| below both trivial predictors') on 1 of 3 configurations" in printed


def test_validate_refuses_a_result_without_the_no_adapter_floor_naming_file_and_key(cli, tmp_path):
    bench = _bench(2, dict(bd_2r=[1.0], slora=[1.0]))
    with pytest.raises(SystemExit, match=r"run0\.json: key 'systems' lacks \['none'\]"):
        _validate(cli, tmp_path, [bench])
