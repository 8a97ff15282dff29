"""tools/bench_serving.py end to end at tiny size: JSON contract, identical greedy outputs across sharding modes,
collectives per decode step, the PEFT baseline, the plot.

Two runs of a 2-layer random Llama (3 requests over 2 adapters), started together: TP 2 with every mode of our
loop at the paper's ranks (--paper-ranks; collectives; --profile), TP 1 with every mode serving one BD adapter set
exactly converted, plus transformers + PEFT. Timings are not asserted (a shared 2-core CPU); output agreement and
collective counts are exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tool_module import load_tool

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "bench_serving.py"
LAYERS = 2
RANK = 4
TINY = (
    "--model",
    "random",
    "--layers",
    str(LAYERS),
    "--hidden",
    "64",
    "--intermediate",
    "96",
    "--heads",
    "8",
    "--kv-heads",
    "4",
    "--num-requests",
    "3",
    "--num-adapters",
    "2",
    "--adapter-rank",
    str(RANK),
    "--prompt-len",
    "4,8",
    "--output-len",
    "3,5",
    "--warmup",
    "2",
)
OURS = ("block_diagonal", "slora", "replicated", "none")
PAPER = ("bd_2r", "bd_4r", "bd_matched", "slora", "replicated", "none")
METRICS = {"output_tokens", "wall_s", "tokens_per_s", "ttft_ms_mean", "ttft_ms_p50", "tpot_ms_mean",
           "latency_s_p50", "latency_s_p99", "engine_steps", "decode_steps", "decode_step_ms_p50", "decode_step_ms_p10"}
FLAGS = ("--tp", "--modes", "--peft", "--json", "--plot", "--num-requests", "--num-adapters", "--adapter-rank",
         "--popularity-alpha", "--arrival", "--rate", "--prompt-len", "--output-len", "--seed", "--model", "--layers",
         "--hidden", "--intermediate", "--heads", "--kv-heads", "--max-num-seqs", "--max-num-batched-tokens",
         "--max-loras", "--max-model-len", "--kv-cache-gb", "--block-size", "--threads", "--warmup", "--repeats",
         "--model-shape", "--paper-ranks", "--bd-ranks", "--profile", "--logprobs", "--prompt-logprobs")


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, out: Path) -> dict:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    result = json.loads(out.read_text())
    result["stdout"] = stdout
    return result


@pytest.fixture(scope="module")  # ~25 s on 2 CPU cores: the tests that use it are marked slow
def runs(tmp_path_factory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("bench_serving")
    procs = {
        2: _start(
            "--tp",
            "2",
            *TINY,
            "--paper-ranks",
            "--profile",
            "--json",
            str(tmp / "tp2.json"),
            "--plot",
            str(tmp / "tp2.png"),
        ),
        1: _start(
            "--tp",
            "1",
            "--threads",
            "1",
            "--peft",
            *TINY,
            "--json",
            str(tmp / "tp1.json"),
            "--plot",
            str(tmp / "tp1.png"),
        ),
    }
    out = {tp: _finish(proc, tmp / f"tp{tp}.json") for tp, proc in procs.items()}
    for tp in out:
        out[tp]["png"] = tmp / f"tp{tp}.png"
    return out


@pytest.mark.multi_rank
@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_json_holds_every_system_with_every_metric(runs, tp):
    result = runs[tp]
    systems = result["systems"]
    assert list(systems) == (list(OURS) + ["peft"] if tp == 1 else list(PAPER))
    workload = result["workload"]["requests"]
    assert len(workload) == 3 and {r["adapter"] for r in workload} <= {0, 1}
    want_tokens = sum(r["output_len"] for r in workload)
    for name, row in systems.items():
        m = row["metrics"]
        assert set(m) == METRICS, name
        assert m["output_tokens"] == want_tokens, f"{name}: every request generates exactly its output length"
        assert m["tokens_per_s"] > 0 and m["wall_s"] > 0 and m["latency_s_p99"] >= m["latency_s_p50"] > 0
        assert m["engine_steps"] >= max(r["output_len"] for r in workload)
        assert [len(t) for t in row["tokens"]] == [r["output_len"] for r in workload]
        assert row["label"] in result["stdout"]
    env = result["environment"]
    assert {
        "date",
        "torch",
        "megatron_core",
        "transformers",
        "peft",
        "host_cpu_count",
        "torch_threads_per_rank",
    } <= set(env)
    if tp == 1:
        assert [r["comparison"] for r in result["ratios"]] == [
            "BD vs S-LoRA",
            "BD vs replicated",
            "BD vs none",
            "BD vs PEFT",
        ]
    else:
        assert [(r["bd"], r["other"]) for r in result["ratios"]] == [
            (bd, other) for bd in PAPER[:3] for other in ("slora", "replicated", "none")]


@pytest.mark.multi_rank
@pytest.mark.slow
def test_greedy_outputs_are_identical_across_sharding_modes_and_adapters_change_them(runs):
    check = runs[1]["agreement"]
    assert check["reference"] == "block_diagonal"
    for mode in ("slora", "replicated"):
        assert check[f"block_diagonal_vs_{mode}"]["mismatches"] == 0, (mode, check[f"block_diagonal_vs_{mode}"])
    assert check["adapter_modes_identical"] and check["mode_mismatches"] == 0
    assert check["outputs_same_every_repeat"]
    assert check["block_diagonal_vs_none"]["mismatches"] > 0, "the random adapters should change greedy outputs"


@pytest.mark.multi_rank
@pytest.mark.slow
def test_paper_ranks_serve_lora_in_both_modes_identically_and_bd_at_2r_4r_and_matched(runs):
    from megatron_bdlora.config import ALL_TARGETS
    from megatron_bdlora.param_count import count_parameters

    result = runs[2]
    check = result["agreement"]
    assert check["slora_vs_replicated"]["mismatches"] == 0 and check["adapter_modes_identical"], check
    assert check["bd_2r_vs_none"]["mismatches"] > 0
    settings = result["config"]["adapter_settings"]
    assert settings["lora"]["rank"] == RANK and settings["lora"]["mode"] == "replicated"
    assert (settings["bd_2r"]["rank"], settings["bd_4r"]["rank"]) == (2 * RANK, 4 * RANK)
    assert all(settings[v]["nblocks"] == 2 and settings[v]["mode"] == "block_diagonal" for v in PAPER[:3])
    # matched: the largest BD rank (a multiple of nblocks) whose adapter is no larger than LoRA's at r
    hf_config, matched = result["config"]["base_hf_config"], settings["bd_matched"]["rank"]
    lora = count_parameters(hf_config, ALL_TARGETS, "replicated", RANK)
    assert count_parameters(hf_config, ALL_TARGETS, "block_diagonal", matched, 2) <= lora
    assert count_parameters(hf_config, ALL_TARGETS, "block_diagonal", matched + 2, 2) > lora


def test_model_shape_gives_the_llama_widths():
    module = load_tool("bench_serving")
    args = module.parse_args(["--tp", "2", "--model-shape", "llama-3.1-70b"])
    assert (args.model, args.hidden, args.intermediate, args.heads, args.kv_heads, args.layers) == (
        "random", 8192, 28672, 64, 8, 2)  # the 70B config.json; 2 layers unless --layers says otherwise


@pytest.mark.multi_rank
@pytest.mark.slow
def test_bd_adds_no_collective_per_decode_step_and_slora_adds_two_per_adapted_layer_pair(runs):
    systems = runs[2]["systems"]
    counts = {name: row["decode_collectives"] for name, row in systems.items()}
    assert all(c for c in counts.values()), counts
    assert counts["bd_2r"] == counts["bd_4r"] == counts["bd_matched"] == counts["none"] == counts["replicated"]
    # attention (qkv -> o) and MLP (gate/up -> down) pairs per layer; S-LoRA: an all-gather and an all-reduce each
    extra = 2 * 2 * LAYERS
    assert runs[2]["expected_extra_collectives_per_forward"] == {"block_diagonal": 0, "slora": extra, "replicated": 0}
    assert sum(counts["slora"].values()) - sum(counts["none"].values()) == extra
    assert counts["slora"]["all_gather_into_tensor"] - counts["none"]["all_gather_into_tensor"] == extra // 2
    assert counts["slora"]["all_reduce"] - counts["none"]["all_reduce"] == extra // 2


@pytest.mark.multi_rank
@pytest.mark.slow
def test_peft_baseline_runs_the_same_prompts_and_is_compared(runs):
    check = runs[1]["agreement"]["block_diagonal_vs_peft"]
    assert check["requests"] == 3 and len(check["first_divergence"]) == 3
    # float32 on both sides: a late near-tie may flip, but a broken adapter mapping or padding would differ at once
    assert check["exact_match_requests"] >= 1, check
    assert runs[1]["systems"]["peft"]["decode_collectives"] is None


@pytest.mark.multi_rank
@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_plot_is_written(runs, tp):
    assert runs[tp]["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_explains_every_flag():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for flag in FLAGS:
        assert flag in proc.stdout, flag


def test_peft_at_tp_above_one_is_refused_before_any_work():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tp", "2", "--peft"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--peft runs at --tp 1 only" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("flag", ["--logprobs", "--prompt-logprobs"])
def test_logprobs_beyond_the_cap_are_refused_before_any_work(flag):
    proc = subprocess.run([sys.executable, str(SCRIPT), flag, "21"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and f"{flag} must be in [0, 20], got 21" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.multi_rank
@pytest.mark.slow
def test_profile_says_where_each_systems_step_time_goes(runs):
    """--profile: per system of our loop, rank 0's top ops over one more replay, ordered by their share of its self
    CPU time per engine step; without the flag (the TP=1 run) no profile is taken."""
    systems = runs[2]["systems"]
    for name, row in systems.items():
        prof = row["profile"]
        assert prof["engine_steps"] >= 1 and prof["self_cpu_ms_per_step"] > 0, name
        shares = [op["share"] for op in prof["ops"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9, name
        assert all(op["calls_per_step"] > 0 and op["ms_per_step"] >= 0 for op in prof["ops"]), name
    assert "ms self CPU per engine step" in runs[2]["stdout"]
    assert all("profile" not in row or row["profile"] is None for row in runs[1]["systems"].values())
