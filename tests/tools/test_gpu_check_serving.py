"""The GPU check's serving parts in their smoke form (CPU, tiny widths): the exactness part passes on the real serving
loop and reports a mismatch naming exactly the requests of an adapter whose served copy was perturbed; the speed
part measures every system at every smoke batch and the LoRA share of a step."""

from __future__ import annotations

import pytest

from megatron_bdlora.bench.gpu_serving import EXACT_ADAPTERS, SPEED_SMOKE, SYSTEMS, exactness_part, speed_part


def test_smoke_exactness_part_passes_on_a_mixed_stream():
    result = exactness_part(smoke=True, budget_s=120)
    assert result.name == "engine_exactness" and result.status == "ok", result.why
    rows = result.data["requests"]
    assert all(r["checked"] and r["ok"] and r["tokens_equal"] for r in rows)
    assert {r["adapter"] for r in rows} == set(EXACT_ADAPTERS) | {None}  # every adapter and the base in one stream
    assert result.data["max_rel_logit_err"] <= 1e-4
    assert len({r["arrival_step"] for r in rows}) > 2  # requests join while others run
    assert any(r["adapter_changes_tokens"] for r in rows)  # the check is not blind to the adapters
    assert "| adapter | rank | nblocks |" in result.markdown


def test_smoke_exactness_part_names_the_requests_of_a_perturbed_served_adapter(monkeypatch):
    """Scale one adapter's B in the served copy only (the reference reads the factors it was written from)."""
    from megatron_bdlora.inference import adapter_slots

    real = adapter_slots.load_host_adapter

    def perturbed(name, *args, **kwargs):
        host = real(name, *args, **kwargs)
        if name == "a2":
            host.shards = {k: v * 1.5 if k.endswith("lora_B") else v for k, v in host.shards.items()}
        return host

    monkeypatch.setattr(adapter_slots, "load_host_adapter", perturbed)  # the loop imports it when it is built
    result = exactness_part(smoke=True, budget_s=120)
    assert result.status == "mismatch", result.why
    failed = {r["request"] for r in result.data["requests"] if r["ok"] is False}
    assert failed == {r["request"] for r in result.data["requests"] if r["adapter"] == "a2"}
    assert f"requests {sorted(failed)} differ" in result.why


def test_smoke_exactness_with_cuda_graphs_is_skipped_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the graphs part runs for real")
    result = exactness_part(smoke=True, budget_s=60, cuda_graphs=True)
    assert result.name == "engine_exactness_graphs" and result.status == "skipped" and "GPU" in result.why


def test_smoke_speed_part_measures_every_system_at_every_batch():
    result = speed_part(smoke=True, budget_s=120)
    assert result.name == "serving_speed" and result.status == "ok", result.why
    rows = result.data["rows"]
    measured = {(r["system"], r["batch"]) for r in rows}
    assert measured == {(s, b) for s in SYSTEMS for b in SPEED_SMOKE.batches}
    assert all(r["decode_steps"] == SPEED_SMOKE.new_tokens - 1 and r["tokens_per_s"] > 0 for r in rows)
    assert "CUDA graphs skipped: no GPU" in result.why  # on CPU; on a GPU the graphs rows are measured too
    prof = result.data["profile"]
    assert prof["batch"] == SPEED_SMOKE.profile_batch and 0 < prof["cpu_lora_share"] < 1
    assert {r["batch"] for r in result.data["ratios"]} == set(SPEED_SMOKE.batches)
    assert all(r["bd_over_none"] and r["bd_over_peft"] and r["bd_over_replicated"] for r in result.data["ratios"])
    assert "| system | batch | CUDA graphs | decode tok/s |" in result.markdown and "BD / PEFT" in result.markdown


def test_speed_part_keeps_what_fits_in_the_budget():
    """No time at all: nothing is measured, every point is listed as skipped with why."""
    result = speed_part(smoke=True, budget_s=0)
    assert result.status == "skipped" and not result.data["rows"]
    assert {(s["system"], s["batch"]) for s in result.data["skipped"]} == {
        (s, b) for s in SYSTEMS for b in SPEED_SMOKE.batches
    }
    assert all("budget" in s["why"] for s in result.data["skipped"])
