"""tools/bench_sweep.py at tiny size (TP 1, in one subprocess): each point runs bench_serving with the axis's flags
set, the table's ratios are the points' own measurements, the cost model's prediction is attached per point, and
flags that clash with the axis are refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "bench_sweep.py"
TINY = ("--tp", "1", "--threads", "1", "--model", "random", "--layers", "2", "--hidden", "64", "--intermediate", "96",
        "--heads", "8", "--kv-heads", "4", "--num-adapters", "2", "--adapter-rank", "4", "--prompt-len", "4,8",
        "--output-len", "3,5", "--warmup", "1", "--repeats", "2", "--paper-ranks", "--bd-ranks", "2r,matched")
VALUES = (1, 3)


@pytest.fixture(scope="module")  # ~11 s on 2 CPU cores: the tests that use it are marked slow
def sweep(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench_sweep")
    machine = json.loads((ROOT / "docs" / "machine_tp2.json").read_text())
    (tmp / "machine.json").write_text(json.dumps(machine | {"tp": 1}))  # a calibration relabelled for TP=1
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "batch=" + ",".join(map(str, VALUES)),
            "--machine",
            str(tmp / "machine.json"),
            "--json",
            str(tmp / "sweep.json"),
            "--plot",
            str(tmp / "sweep.png"),
            "--",
            *TINY,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(json.loads((tmp / "sweep.json").read_text()), stdout=proc.stdout, png=tmp / "sweep.png",
                machine=tmp / "machine.json")


@pytest.mark.multi_rank
@pytest.mark.slow
def test_each_point_runs_bench_serving_with_the_axis_flags(sweep):
    assert [p["value"] for p in sweep["points"]] == list(VALUES)
    for point in sweep["points"]:
        cfg, workload = point["result"]["config"], point["result"]["workload"]["requests"]
        assert cfg["max_num_seqs"] == cfg["num_requests"] == point["value"] == len(workload)
        assert list(point["result"]["systems"]) == ["bd_2r", "bd_matched", "slora", "replicated", "none"]
        assert point["result"]["agreement"]["adapter_modes_identical"], "S-LoRA and replicated serve the same adapters"


@pytest.mark.multi_rank
@pytest.mark.slow
def test_table_ratios_are_the_points_own_measurements(sweep):
    rows = sweep["rows"]
    assert [(r["value"], r["bd"]) for r in rows] == [(v, bd) for v in VALUES for bd in ("bd_2r", "bd_matched")]
    for row in rows:
        systems = next(p for p in sweep["points"] if p["value"] == row["value"])["result"]["systems"]
        bd = systems[row["bd"]]["metrics"]
        for other in ("slora", "replicated", "none"):
            o = systems[other]["metrics"]
            assert row[f"tokens_per_s_vs_{other}"] == pytest.approx(bd["tokens_per_s"] / o["tokens_per_s"], rel=1e-12)
            assert row[f"step_vs_{other}"] == pytest.approx(
                o["decode_step_ms_p50"] / bd["decode_step_ms_p50"], rel=1e-12
            )
            per_repeat = sorted(a["decode_step_ms_p50"] / b["decode_step_ms_p50"]
                                for a, b in zip(systems[other]["per_repeat"], systems[row["bd"]]["per_repeat"]))
            assert len(per_repeat) == 2 and row[f"paired_step_vs_{other}"] == pytest.approx(
                sum(per_repeat) / 2, rel=1e-12
            )
        assert f"{row['tokens_per_s_vs_slora']:.3f}" in sweep["stdout"]
    assert sweep["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.multi_rank
@pytest.mark.slow
def test_cost_model_prediction_is_attached_per_point(sweep):
    from megatron_bdlora.bench import cost_model

    machine = cost_model.load_machine(str(sweep["machine"]))
    for point in sweep["points"]:
        want = {
            r["bd"]: r["predicted_ratio"] for r in cost_model.validate(point["result"], machine, "decode_step_ms_p50")
        }
        got = {r["bd"]: r["predicted_step_vs_slora"] for r in sweep["rows"] if r["value"] == point["value"]}
        assert got == pytest.approx(want, rel=1e-12) and all(v > 0 for v in got.values())


@pytest.mark.parametrize("argv, message", [
    (["batch=1,4", "--", "--num-requests", "8", "--paper-ranks"], "must not set what the sweep sets per point"),
    (["layers=2", "--", "--tp", "2", "--layers=4", "--paper-ranks"], "must not set what the sweep sets per point"),
    (["depth=1,2", "--", "--paper-ranks"], "NAME one of ['adapters', 'batch', 'layers']"),
    (["batch=1,1", "--", "--paper-ranks"], "distinct integers >= 1"),
    (["adapters=2,4", "--", "--tp", "2"], "pass --paper-ranks"),
    (["batch=1", "--machine", "no/such.json", "--", "--paper-ranks"], "no such file"),
])
def test_bad_sweeps_are_refused_before_any_work(argv, message, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_sweep

    with pytest.raises(SystemExit) as exc:
        bench_sweep.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
