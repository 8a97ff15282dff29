"""tools/bench_layers.py end to end at tiny sizes: JSON contract, matched parameter counts, collectives per mode.

Timings are not asserted (a shared 2-core CPU); the counts are exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "bench_layers.py"
TP, D_MODEL, D_FFN, RANK = 2, 32, 96, 4  # LoRA 1024 params; BD 160 per unit rank -> rank 6 (960), rank 8 would be 1280
FLAGS = ("--tp", "--json", "--d-model", "--d-ffn", "--seq", "--batch", "--rank", "--repeats", "--warmup", "--dtype")
ROW_KEYS = {
    "variant", "mode", "rank", "adapter_params", "adapter_params_per_rank",
    "fwd_ms_median", "fwd_ratio", "fwd_ms_min", "fwd_bwd_ms_median", "fwd_bwd_ratio", "fwd_bwd_ms_min",
    "collectives_fwd", "collectives_bwd", "base_frozen", "adapters_get_grads", "fwd_ms", "fwd_bwd_ms",
}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _lora_params(r: int) -> int:
    """Closed form, both layers: r (d_in + d_out) each."""
    return r * (D_MODEL + D_FFN) + r * (D_FFN + D_MODEL)


def _bd_params(r: int) -> int:
    """Closed form: column r (d_in + d_out/N), row r (d_in/N + d_out)."""
    return r * (D_MODEL + D_FFN // TP) + r * (D_FFN // TP + D_MODEL)


def _plus(counts: dict, *ops: str) -> dict:
    out = dict(counts)
    for op in ops:
        out[op] = out.get(op, 0) + 1
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = ["--tp", str(TP), "--d-model", str(D_MODEL), "--d-ffn", str(D_FFN), "--seq", "4", "--batch", "2"]
    proc = _run(*args, "--rank", str(RANK), "--repeats", "2", "--warmup", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    result["stdout"] = proc.stdout
    return result


@pytest.mark.multi_rank
def test_json_holds_config_environment_and_one_row_per_variant(bench):
    cfg, env, rows = bench["config"], bench["environment"], bench["rows"]
    assert (cfg["tp"], cfg["d_model"], cfg["d_ffn"], cfg["rank"], cfg["repeats"], cfg["dtype"]) == (
        TP,
        D_MODEL,
        D_FFN,
        RANK,
        2,
        "float32",
    )
    assert {"torch", "megatron_core", "host_cpu_count", "backend"} <= set(env)
    assert [r["variant"] for r in rows] == ["base", "bd-lora", "s-lora", "replicated"]
    for r in rows:
        assert set(r) == ROW_KEYS, r["variant"]
        assert len(r["fwd_ms"]) == len(r["fwd_bwd_ms"]) == 2
        assert r["fwd_ms_median"] > 0 and r["fwd_bwd_ms_median"] > 0
        assert r["base_frozen"], f"{r['variant']}: the base weight received a gradient"
        assert r["adapters_get_grads"], f"{r['variant']}: an adapter factor got no gradient"
        assert r["variant"] in bench["stdout"]
    assert rows[0]["fwd_ratio"] == rows[0]["fwd_bwd_ratio"] == 1.0


@pytest.mark.multi_rank
def test_bd_rank_is_the_largest_multiple_of_nblocks_within_the_lora_parameter_count(bench):
    rows = {r["variant"]: r for r in bench["rows"]}
    want_bd = max(r for r in range(TP, 100 * RANK, TP) if _bd_params(r) <= _lora_params(RANK))
    assert bench["config"]["bd_rank"] == rows["bd-lora"]["rank"] == want_bd == 6
    assert rows["base"]["adapter_params"] == rows["base"]["adapter_params_per_rank"] == 0
    assert rows["bd-lora"]["adapter_params"] == _bd_params(want_bd)
    assert rows["s-lora"]["adapter_params"] == rows["replicated"]["adapter_params"] == _lora_params(RANK)
    # stored per rank: BD and S-LoRA split every factor; replicated keeps column A and row B whole
    assert rows["bd-lora"]["adapter_params_per_rank"] == _bd_params(want_bd) // TP
    assert rows["s-lora"]["adapter_params_per_rank"] == _lora_params(RANK) // TP
    assert rows["replicated"]["adapter_params_per_rank"] == RANK * (D_MODEL + D_FFN // TP) * 2


@pytest.mark.multi_rank
def test_bd_adds_no_collective_and_baselines_add_one_per_adapted_layer(bench):
    rows = {r["variant"]: r for r in bench["rows"]}
    base_f, base_b = rows["base"]["collectives_fwd"], rows["base"]["collectives_bwd"]
    # megatron's own: the row layer all-reduces its output, the column layer its input gradient
    assert (base_f, base_b) == ({"all_reduce": 1}, {"all_reduce": 1})
    bd = rows["bd-lora"]
    assert (bd["collectives_fwd"], bd["collectives_bwd"]) == (base_f, base_b)
    sl = rows["s-lora"]  # column: all-gather (grad reduce-scatter); row: all-reduce both ways
    assert sl["collectives_fwd"] == _plus(base_f, "all_gather_into_tensor", "all_reduce")
    assert sl["collectives_bwd"] == _plus(base_b, "reduce_scatter_tensor", "all_reduce")
    rep = rows["replicated"]  # the whole factor's gradient (column A, row B) is all-reduced
    assert rep["collectives_fwd"] == base_f
    assert rep["collectives_bwd"] == _plus(base_b, "all_reduce", "all_reduce")


def test_help_explains_every_flag():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for flag in FLAGS:
        assert flag in proc.stdout, flag


def test_shapes_that_do_not_shard_are_rejected_before_spawning():
    proc = _run("--tp", "2", "--d-ffn", "63", "--repeats", "1")
    assert proc.returncode != 0
    assert "d_out=63" in proc.stderr and "tp=2" in proc.stderr, proc.stderr[-2000:]
