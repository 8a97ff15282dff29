"""The GPU check's kernels part in its smoke form (the checks scaled down, Triton's interpreter without a GPU): it
passes on the real kernels with every error within its tolerance, and reports a mismatch when the reference is
off by 1e-3 of its scale (more than the fp32 tolerance)."""

from __future__ import annotations

from megatron_bdlora.bench.kernels import gpu_check_part


def test_smoke_part_passes_with_its_check_table():
    result = gpu_check_part(smoke=True, budget_s=60)
    assert result.name == "kernels" and result.status == "ok", result.why
    checks = result.data["checks"]
    assert checks and all(max(r["err_shrink"], r["err_expand"]) <= r["tolerance"] for r in checks)
    assert all(r["base_rows_untouched"] for r in checks)
    assert "| mode | kind | dtype | max rel err | tolerance | ok |" in result.markdown
    assert "timings" not in result.data and result.data["timings_skipped"]


def test_smoke_part_reports_a_wrong_reference(monkeypatch):
    from megatron_bdlora import ops

    real = ops._grouped_matmul  # the torch path of both lora_shrink and lora_expand
    monkeypatch.setattr(ops, "_grouped_matmul", lambda *a, **k: real(*a, **k) * (1 + 1e-3))
    result = gpu_check_part(smoke=True, budget_s=60)
    assert result.status == "mismatch"
    failed = {r["dtype"] for r in result.data["checks"] if not r["ok"]}
    assert "float32" in failed  # 1e-3 is 100x fp32's tolerance (fp16's 2e-3 may absorb it)
    assert "| NO |" in result.markdown and "checks failed" in result.why
