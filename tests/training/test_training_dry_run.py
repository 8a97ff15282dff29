"""The trainer's --dry-run on the shipped Llama-3.1 8B / 70B TP=8 configs: no weights, no process group, and
numbers that agree with param_count, the rank-match tool, the sharding table and transformers' own parameter count.
(Per-rank parameters and collectives of a real built model are checked against it in test_model.py.)"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tool_module import load_tool

from megatron_bdlora.config import COLUMN_TARGETS
from megatron_bdlora.param_count import BUILTIN_CONFIGS, count_parameters
from megatron_bdlora.train import main as train_main
from megatron_bdlora.training.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {"llama-3.1-8b": ROOT / "configs" / "llama-3.1-8b-bdlora-tp8.yaml",
           "llama-3.1-70b": ROOT / "configs" / "llama-3.1-70b-bdlora-tp8.yaml"}


def dry_run_json(config: Path, *extra: str) -> dict:
    """The report of `python -m megatron_bdlora.train --config C --dry-run --json [extra]`, run in-process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train_main(["--config", str(config), "--dry-run", "--json", *extra]) == 0
    return json.loads(out.getvalue())


def rank_match_rows(model: str, nblocks: int, lora_rank: int) -> list[dict]:
    """tools/rank_match.py --json, run in-process."""
    module = load_tool("rank_match")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main(["--model", model, "--nblocks", str(nblocks), "--rank", str(lora_rank), "--json"])
    return json.loads(out.getvalue())["rows"]


def test_cli_dry_run_of_the_8b_config_needs_no_weights_and_no_process_group(tmp_path):
    """The documented command, as a process: exit 0, the plan printed, and nothing written to the model cache."""
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_bdlora.train", "--config", str(SHIPPED["llama-3.1-8b"]), "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**{k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}, "MEGATRON_BDLORA_CACHE": str(cache)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for needle in ("sharding plan", "q_proj", "memory per rank", "collectives per step", "tokens per step",
                   "TP 8 x DP 1", "ZeRO-1"):
        assert needle in proc.stdout, needle
    assert "init_process_group" not in proc.stderr and not cache.exists()


def test_dry_run_reads_config_json_only(tmp_path):
    """A base directory whose weights are garbage still dry-runs (they are never opened); no process group."""
    base = tmp_path / "Meta-Llama-3.1-8B-Instruct"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", **BUILTIN_CONFIGS["llama-3.1-8b"]}))
    (base / "model.safetensors").write_bytes(b"not a safetensors file")
    report = dry_run_json(SHIPPED["llama-3.1-8b"], f"model.base={base}")
    assert report["config_source"] == f"{base}/config.json"
    assert not torch.distributed.is_initialized()


def _hand_plan(cfg: dict, target: str, rank: int, nblocks: int, tp: int) -> tuple[tuple, tuple]:
    """README's BD table by hand: column A rows i, packed B rows i; row packed A rows i, B columns i."""
    h, ffn, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    d_in, d_out = {
        "q_proj": (h, h),
        "k_proj": (h, cfg["num_key_value_heads"] * hd),
        "v_proj": (h, cfg["num_key_value_heads"] * hd),
        "o_proj": (h, h),
        "gate_proj": (h, ffn),
        "up_proj": (h, ffn),
        "down_proj": (ffn, h),
    }[target]
    if target in COLUMN_TARGETS:
        return (rank // tp, d_in), (d_out // tp, rank // nblocks)
    return (rank // tp, d_in // nblocks), (d_out, rank // tp)


@pytest.mark.parametrize("model", sorted(SHIPPED))
def test_dry_run_numbers_agree_with_param_count_rank_match_and_the_plan(model):
    cfg = load_config(SHIPPED[model])
    report = dry_run_json(SHIPPED[model])
    lora, hf = cfg.lora, BUILTIN_CONFIGS[model]
    tp, layers = cfg.parallel.tp, hf["num_hidden_layers"]
    total = report["adapter_parameters"]["total"]
    assert total == count_parameters(hf, lora.targets, lora.mode, lora.rank, lora.nblocks)
    # the configs say "BD rank 32 = 0.86x LoRA rank 16": the rank-match tool's row at the config's rank
    bd_rows = [r for r in rank_match_rows(model, lora.nblocks, lora.rank // 2) if r["mode"] == "block_diagonal"]
    assert total in {r["parameters"] for r in bd_rows if r["rank"] == lora.rank}
    per_rank = 0
    for row in report["sharding_plan"]:
        a, b = _hand_plan(hf, row["target"], lora.rank, lora.nblocks, tp)
        assert (tuple(row["a_local"]), tuple(row["b_local"])) == (a, b), row["target"]
        assert row["collective"] == "none" and row["replicated"] == [], row
        per_rank += layers * (a[0] * a[1] + b[0] * b[1])
    assert [row["target"] for row in report["sharding_plan"]] == list(lora.targets)
    assert report["adapter_parameters"]["per_rank"] == per_rank == total // tp  # BD: every factor split over TP
    # base weights: transformers' own count, plus the norms every rank repeats and vocabulary padding rows
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        hf_params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**hf)).parameters())
    m = report["model"]
    padding = (m["padded_vocab_size"] - m["vocab_size"]) * m["hidden_size"] * (1 if m["tie_word_embeddings"] else 2)
    replicated_norms = (tp - 1) * (2 * layers + 1) * m["hidden_size"]
    assert m["base_parameters_per_rank"] * tp == hf_params + padding + replicated_norms
    memory = report["memory_bytes_per_rank"]
    assert memory["base_weights"] == 2 * m["base_parameters_per_rank"]  # bfloat16
    assert memory["adapter_weights"] == 2 * per_rank
    batch = report["batch"]
    assert (
        batch["micro_batch_size"] * batch["grad_accum"] * batch["dp"]
        == batch["global_batch_size"]
        == cfg.parallel.global_batch_size
    )
    assert (batch["tp"], batch["dp"]) == (tp, 1) and batch["tokens_per_step"] == batch[
        "global_batch_size"
    ] * cfg.data.seq_length
    collectives = report["collectives_per_step"]
    micro = collectives["tensor_parallel_per_micro_batch"]
    assert collectives["tensor_parallel"] == {k: batch["grad_accum"] * v for k, v in micro.items()}
    assert micro["all_gather"] == micro["reduce_scatter"] == 0  # BD adds no LoRA collective


def test_dry_run_follows_the_zero_stage_and_dp_size():
    """ZeRO-1 shards optimizer state over DP but not gradients; ZeRO-2 shards both; more DP, fewer micro-batches."""
    config = SHIPPED["llama-3.1-70b"]
    one = dry_run_json(config)
    two = dry_run_json(config, "--world-size", "16")
    zero2 = dry_run_json(config, "--world-size", "16", "deepspeed.zero_stage=2")
    assert (two["batch"]["dp"], two["batch"]["grad_accum"]) == (2, one["batch"]["grad_accum"] // 2)
    per_rank = one["adapter_parameters"]["per_rank"]
    assert two["adapter_parameters"]["per_rank"] == per_rank
    m1, m2, z2 = (r["memory_bytes_per_rank"] for r in (one, two, zero2))
    assert m2["optimizer_state"] == m1["optimizer_state"] // 2 and m2["adapter_gradients"] == m1["adapter_gradients"]
    assert z2["optimizer_state"] == m2["optimizer_state"] and z2["adapter_gradients"] == m1["adapter_gradients"] // 2
    # bf16 + ZeRO: fp32 master and two fp32 AdamW moments per trained parameter (12 bytes), split over DP
    assert m1["optimizer_state"] == 12 * per_rank
    assert m2["activations"] == m1["activations"] and m2["base_weights"] == m1["base_weights"]
    assert one["collectives_per_step"]["data_parallel"]["gradient_reduce"] == 0  # DP 1: nothing to reduce
    assert two["collectives_per_step"]["data_parallel"]["gradient_reduce"] == 1  # ZeRO-1: once per step
    assert zero2["collectives_per_step"]["data_parallel"]["gradient_reduce"] == zero2["batch"]["grad_accum"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--world-size", "12"], "world size 12 is not divisible by parallel.tp=8"),
        (["lora.rank=36"], "rank=36 is not divisible by nblocks=8"),
        (["model.base=/nowhere/my-model"], "matches no built-in shape"),
    ],
)
def test_dry_run_rejects_what_the_job_would_reject(extra, message, capsys):
    assert train_main(["--config", str(SHIPPED["llama-3.1-8b"]), "--dry-run", *extra]) == 2
    assert message in capsys.readouterr().err
