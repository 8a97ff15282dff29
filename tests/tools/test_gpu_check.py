"""tools/gpu_check.py: the prepared GPU check runs end to end at smoke size on CPU (so it cannot rot between GPU
windows), writes its JSON and Markdown reports, and exits non-zero when any part mismatches or crashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multi_rank
@pytest.mark.slow
def test_smoke_run_passes_every_part_and_writes_both_reports(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--smoke", "--out", str(tmp_path), "--commit", "abc123"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {p["name"]: p["status"] for p in report["parts"]}
    assert statuses == {"kernels": "ok", "engine_exactness": "ok", "engine_exactness_graphs": "skipped",
                        "training": "ok", "serve_cli": "ok", "serving_speed": "ok"}, statuses
    assert report["smoke"] and report["environment"]["code"]["commit"] == "abc123"
    assert report["environment"]["attention"] == "torch-cpu"
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| engine_exactness_graphs | skipped |" in markdown and "CUDA graphs need a GPU" in markdown
    for part in ("kernels", "engine_exactness", "training", "serve_cli", "serving_speed"):
        assert f"## {part}" in markdown


@pytest.mark.parametrize("status,code", [("ok", 0), ("skipped", 0), ("mismatch", 1), ("error", 1)])
def test_exit_status_follows_the_worst_part(tmp_path, monkeypatch, status, code):
    from megatron_bdlora.bench import gpu_check
    from megatron_bdlora.bench.report import PartResult

    parts = (gpu_check.Part("fine", 0.5, 0, lambda smoke, budget: PartResult("fine", "ok")),
             gpu_check.Part("probe", 0.5, 0, lambda smoke, budget: PartResult("probe", status, "why")))
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    assert gpu_check.run_check(tmp_path, smoke=True, budget_s=10) == code
    assert [p["status"] for p in json.loads((tmp_path / "gpu_check.json").read_text())["parts"]] == ["ok", status]


def test_a_crashing_part_is_reported_with_its_traceback_and_the_rest_still_run(tmp_path, monkeypatch):
    from megatron_bdlora.bench import gpu_check
    from megatron_bdlora.bench.report import PartResult

    def crash(smoke, budget):
        raise RuntimeError("boom")

    parts = (gpu_check.Part("crash", 0.5, 0, crash),
             gpu_check.Part("after", 0.5, 0, lambda smoke, budget: PartResult("after", "ok")))
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    assert gpu_check.run_check(tmp_path, smoke=True, budget_s=10) == 1
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| crash | error |" in markdown and "RuntimeError: boom" in markdown and "| after | ok |" in markdown


def test_a_part_that_would_not_fit_is_skipped_with_why(tmp_path, monkeypatch):
    from megatron_bdlora.bench import gpu_check

    ran = []
    parts = (gpu_check.Part("big", 1.0, 100, lambda smoke, budget: ran.append(budget)),)
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    assert gpu_check.run_check(tmp_path, smoke=True, budget_s=10) == 0
    part = json.loads((tmp_path / "gpu_check.json").read_text())["parts"][0]
    assert not ran and part["status"] == "skipped" and "needs about 100 s" in part["why"]


def test_cli_refuses_a_full_run_without_a_gpu_and_unknown_parts(tmp_path):
    import torch

    if not torch.cuda.is_available():
        res = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "no CUDA GPU" in res.stderr
    res = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path), "--smoke", "--parts", "kernel"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown part(s) ['kernel']" in res.stderr
