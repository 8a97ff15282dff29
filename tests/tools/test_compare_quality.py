"""tools/compare_quality.py without training: method sizes, run overrides, summary statistics, the table, the
plot, the cache guard and argument validation, on synthetic results."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = dict(
    hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def cq():
    """The comparison behind tools/compare_quality.py (megatron_bdlora.bench.quality)."""
    from megatron_bdlora.bench import quality

    return quality


@pytest.fixture(scope="module")
def methods(cq):
    return cq.comparison_methods(SMOLLM2, TARGETS, nblocks=3, lora_rank=8)


def _runs(cq, methods):
    """Synthetic results: two seeds per method and task, with known values."""
    values = {  # method -> task -> [seed 0, seed 1]
        methods[0].name: {"comedies": [30.0, 32.0], "milton": [120.0, 124.0], "which_play": [0.40, 0.50]},
        methods[1].name: {"comedies": [31.0, 31.0], "milton": [118.0, 130.0], "which_play": [0.30, 0.60]},
        methods[2].name: {"comedies": [29.0, 30.0], "milton": [119.0, 121.0], "which_play": [0.45, 0.45]},
    }
    runs = []
    for m, per_task in values.items():
        for task, vals in per_task.items():
            metric = cq.TASKS[task].metric
            for seed, v in zip((1, 0), reversed(vals)):  # out of seed order on purpose
                runs.append({"method": m, "task": task, "seed": seed, "metrics": {metric: v}})
    return runs, values


def test_methods_are_lora_the_matched_bd_rank_and_twice_it(methods):
    assert [(m.mode, m.rank, m.nblocks) for m in methods] == [
        ("replicated", 8, None), ("block_diagonal", 12, 3), ("block_diagonal", 24, 3)]
    lora, bd, bd2 = methods
    assert lora.params == 8 * 30 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))  # q,o; k,v; gate,up,down
    assert bd.params <= lora.params and bd2.params == 2 * bd.params
    assert bd.ratio == pytest.approx(0.896, abs=5e-4) and bd2.ratio == pytest.approx(1.792, abs=1e-3)


def test_overrides_differ_across_methods_only_in_the_adapter(cq, methods, tmp_path):
    args = cq.parse_args(["--out", str(tmp_path / "q.json")])
    task = cq.TASKS["which_play"]
    per_method = [cq.train_overrides(args, task, m, 0, tmp_path / "run") for m in methods]
    shared = [set(o for o in ov if not o.startswith("lora.")) for ov in per_method]
    assert shared[0] == shared[1] == shared[2]
    assert {"data.format=chat", "data.seq_length=128", "optimizer.lr=0.001", "seed=0"} <= shared[0]
    assert "lora.nblocks=null" in per_method[0] and "lora.alpha=16" in per_method[0]
    assert {"lora.rank=24", "lora.alpha=48", "lora.nblocks=3", "lora.mode=block_diagonal"} <= set(per_method[2])


def test_overrides_are_a_valid_trainer_config(cq, methods, tmp_path):
    from megatron_bdlora.training.config import load_config

    args = cq.parse_args(["--out", str(tmp_path / "q.json"), "--steps", "7"])
    for m in methods:
        cfg = load_config(ROOT / cq.CONFIG, cq.train_overrides(args, cq.TASKS["milton"], m, 3, tmp_path / "run"))
        assert (cfg.lora.mode, cfg.lora.rank, cfg.lora.alpha, cfg.lora.nblocks) == (
            m.mode,
            m.rank,
            2 * m.rank,
            m.nblocks,
        )
        assert (cfg.schedule.train_steps, cfg.seed, cfg.checkpoint.every) == (7, 3, 0)


def test_summary_gives_mean_and_sample_std_over_seeds(cq, methods):
    tasks = list(cq.TASKS.values())
    runs, values = _runs(cq, methods)
    summary = cq.summarize(runs, methods, tasks)
    assert len(summary) == len(methods) * len(tasks)
    for row in summary:
        vals = values[row["method"]][row["task"]]
        assert row["seeds"] == [0, 1] and row["values"] == vals and row["n"] == 2
        assert row["mean"] == pytest.approx(statistics.fmean(vals))
        assert row["std"] == pytest.approx(statistics.stdev(vals))
    one_seed = cq.summarize([r for r in runs if r["seed"] == 0], methods, tasks)
    assert all(row["std"] is None and row["n"] == 1 for row in one_seed)
    assert cq.summarize(runs, methods, [cq.TASKS["milton"]])[0]["task"] == "milton"


def test_table_has_base_row_params_ratio_and_mean_std_cells(cq, methods):
    tasks = list(cq.TASKS.values())
    runs, _ = _runs(cq, methods)
    base = {"comedies": {"ppl": 40.0}, "milton": {"ppl": 190.123}, "which_play": {"accuracy": 0.0}}
    lines = cq.format_table(cq.summarize(runs, methods, tasks), methods, tasks, base).splitlines()
    assert lines[0] == "| method | trainable params | ratio to LoRA | comedies ppl | Milton ppl | which_play acc |"
    assert lines[2] == "| base model (no adapter) | 0 | – | 40.00 | 190.12 | 0.0% |"
    lora = lines[3].split(" | ")
    assert lora[0] == f"| {methods[0].label}" and lora[1] == f"{methods[0].params:,}" and lora[2] == "1.000"
    assert lora[3:] == ["31.00 ± 1.41", "122.00 ± 2.83", "45.0 ± 7.1% |"]
    assert lines[5].split(" | ")[2] == f"{methods[2].ratio:.3f}"


def test_table_marks_missing_tasks_and_single_seeds(cq, methods):
    tasks = list(cq.TASKS.values())
    runs, _ = _runs(cq, methods)
    seed0_milton = [r for r in runs if r["seed"] == 0 and r["task"] == "milton"]
    table = cq.format_table(cq.summarize(seed0_milton, methods, tasks), methods, tasks, {})
    row = table.splitlines()[3].split(" | ")
    assert row[3] == "–" and row[4] == "120.00" and row[5] == "– |"


def test_plot_writes_a_png(cq, methods, tmp_path):
    tasks = list(cq.TASKS.values())
    runs, _ = _runs(cq, methods)
    base = {"comedies": {"ppl": 40.0}, "milton": {"ppl": 190.0}, "which_play": {"accuracy": 0.1}}
    out = tmp_path / "q.png"
    cq.plot(cq.summarize(runs, methods, tasks), methods, tasks, base, out, "synthetic")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cached_result_with_other_settings_is_refused(cq, tmp_path):
    path = tmp_path / "result.json"
    assert cq.cached(path, {"a": 1}) is None
    cq.write_json(path, {"key": {"a": 1}, "value": 3})
    assert cq.cached(path, {"a": 1})["value"] == 3
    with pytest.raises(SystemExit, match="other settings"):
        cq.cached(path, {"a": 2})


def test_training_counts_as_complete_only_with_adapter_and_last_step(cq, tmp_path):
    run = tmp_path / "train"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))
    assert not cq.training_complete(run, 2)  # no adapter yet
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_manifest.json").write_text("{}")
    assert cq.training_complete(run, 2) and not cq.training_complete(run, 3)


def test_spaced_indices_cover_the_file_evenly(cq):
    assert cq.spaced_indices(5, 10) == [0, 1, 2, 3, 4]
    assert cq.spaced_indices(101, 5) == [0, 25, 50, 75, 100]
    assert cq.spaced_indices(7, 1) == [0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be positive"),
        (["--seeds", "0", "0"], "--seeds must be distinct"),
        (["--tasks", "milton", "milton"], "--tasks must be distinct"),
        (["--tasks", "sonnets"], "invalid choice: 'sonnets'"),
        (["--warmup", "11", "--steps", "10"], "--warmup must be in [0, --steps=10]"),
        (["--global-batch", "6", "--micro-batch", "4"], "not a multiple of --micro-batch 4"),
        (["--eval-records", "0"], "--eval-records must be positive"),
        (["--lr", "-1"], "--lr must be positive"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(cq, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cq.parse_args(["--out", "q.json", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_out_is_required(cq, capsys):
    with pytest.raises(SystemExit):
        cq.parse_args([])
    assert "--out" in capsys.readouterr().err


def test_help_explains_every_flag(cq, capsys):
    parser = cq.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
        assert all(flag in text for flag in action.option_strings)

def test_training_launch_runs_the_package_trainer_under_torchrun(cq):
    cmd = cq.train_command(cq.parse_args(["--out", "q.json"]), ["seed=0"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert cmd[6:8] == ["-m", "megatron_bdlora.train"] and cmd[-3:] == ["--config", cq.CONFIG, "seed=0"]
