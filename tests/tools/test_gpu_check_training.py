"""The GPU check's training part in its smoke form (CPU, tiny sizes): the trainer's float32 gradients, loss and
gradient norm equal transformers + PEFT's float64 ones, a bfloat16 run trains, and a trainer whose loss is off by
1e-4 is reported as a mismatch."""

from __future__ import annotations

import math

from megatron_bdlora.bench.gpu_training import BF16_LOSS_RTOL, DUMP_STEPS, GRAD_RTOL, SMOKE_SIZES, gpu_check_part


def test_smoke_training_part_matches_float64_peft_and_trains_in_bf16():
    result = gpu_check_part(smoke=True, budget_s=120)
    assert result.name == "training" and result.status == "ok", result.why
    data = result.data
    assert [r["step"] for r in data["gradient_checks"]] == list(DUMP_STEPS)
    assert data["max_rel_grad_err"] <= GRAD_RTOL
    for row in data["gradient_checks"]:
        assert (
            row["grad_rel_err"] <= GRAD_RTOL
            and row["loss_rel_err"] <= GRAD_RTOL
            and row["grad_norm_rel_err"] <= GRAD_RTOL
        )
        assert len(set(row["loss_tokens_per_example"])) > 1, "micro-batches must differ in loss tokens"
    for dtype in ("float32", "bfloat16"):
        run = data[dtype]
        assert len(run["losses"]) == len(run["step_s"]) == SMOKE_SIZES.steps, dtype
        assert all(math.isfinite(x) for x in run["losses"]) and run["tokens_per_s"] > 0, dtype
    assert data["bfloat16"]["step1_rel_diff_vs_float32"] <= BF16_LOSS_RTOL
    assert "| float32 |" in result.markdown and "| bfloat16 |" in result.markdown


def test_smoke_training_part_reports_a_trainer_whose_loss_is_off(monkeypatch):
    """Every token loss the trainer backpropagates scaled by 1 + 1e-4: gradients and loss off by 1e-4, ten times the
    tolerance; the reference reads only the run's dumped weights, so it stays right."""
    from megatron_bdlora.training import loop

    real = loop.token_losses
    monkeypatch.setattr(loop, "token_losses", lambda model, batch: real(model, batch) * (1 + 1e-4))
    result = gpu_check_part(smoke=True, budget_s=120)
    assert result.status == "mismatch", result.why
    assert (
        "float32 step 1: gradients vs float64 PEFT" in result.why
        and "float32 step 1: loss vs float64 PEFT" in result.why
    )
    assert 5e-5 < result.data["max_rel_grad_err"] < 5e-4
