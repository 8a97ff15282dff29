"""LoRA vs BD-LoRA parameter counts and matched rank (megatron_bdlora.param_count, tools/rank_match.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tool_module import load_tool

from megatron_bdlora.param_count import BUILTIN_CONFIGS, comparison_rows, count_parameters, match_bd_rank

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "tools" / "rank_match.py"
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_3_2_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_hidden_layers=16,
    head_dim=64,
)


def _reference_count(cfg: dict, targets: tuple[str, ...], rank: int, nblocks: int | None) -> int:
    """Independent closed form: LoRA r(d_in + d_out); BD column r(d_in + d_out/N), row r(d_in/N + d_out)."""
    h, ffn = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", h // heads)
    shapes = {  # name: (d_in, d_out, is_row)
        "q_proj": (h, heads * hd, False),
        "k_proj": (h, kv * hd, False),
        "v_proj": (h, kv * hd, False),
        "o_proj": (heads * hd, h, True),
        "gate_proj": (h, ffn, False),
        "up_proj": (h, ffn, False),
        "down_proj": (ffn, h, True),
    }
    total = 0
    for name in targets:
        d_in, d_out, is_row = shapes[name]
        if nblocks is None:
            total += rank * (d_in + d_out)
        elif is_row:
            total += rank * (d_in // nblocks + d_out)
        else:
            total += rank * (d_in + d_out // nblocks)
    return total * cfg["num_hidden_layers"]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("model", sorted(BUILTIN_CONFIGS))
@pytest.mark.parametrize("nblocks", [2, 8])
def test_counts_equal_closed_form_on_builtin_shapes(model, nblocks):
    cfg = BUILTIN_CONFIGS[model]
    for targets in (ALL, ("q_proj", "v_proj"), ("o_proj", "down_proj")):
        assert count_parameters(cfg, targets, "replicated", 16) == _reference_count(cfg, targets, 16, None)
        for rank in (16, 32):
            got = count_parameters(cfg, targets, "block_diagonal", rank, nblocks)
            assert got == _reference_count(cfg, targets, rank, nblocks)


@pytest.mark.parametrize(
    "model, ratio_2r, ratio_4r",
    [("llama-3.1-8b", "0.8625", "1.725"), ("llama-3.1-70b", "0.8703", "1.741")],
)
def test_paper_ratios_bd_2r_and_4r_over_lora_at_n8_rank16(model, ratio_2r, ratio_4r):
    cfg = BUILTIN_CONFIGS[model]
    lora = _reference_count(cfg, ALL, 16, None)
    assert f"{_reference_count(cfg, ALL, 32, 8) / lora:.4g}" == ratio_2r
    assert f"{_reference_count(cfg, ALL, 64, 8) / lora:.4g}" == ratio_4r
    rows = {r.label: r for r in comparison_rows(cfg, ALL, 8, 16)}
    assert f"{rows['BD 2r'].ratio:.4g}" == ratio_2r
    assert f"{rows['BD 4r'].ratio:.4g}" == ratio_4r


def test_matched_rank_llama_3_2_1b_n2_rank64_is_96_with_exact_counts():
    assert count_parameters(LLAMA_3_2_1B, ALL, "replicated", 64) == 45_088_768
    assert match_bd_rank(LLAMA_3_2_1B, ALL, 2, 64) == 96
    assert count_parameters(LLAMA_3_2_1B, ALL, "block_diagonal", 96, 2) == 44_826_624
    assert count_parameters(LLAMA_3_2_1B, ALL, "block_diagonal", 98, 2) > 45_088_768  # one step more overshoots


def test_comparison_rows_are_lora_then_bd_r_2r_4r_matched():
    rows = comparison_rows(LLAMA_3_2_1B, ALL, 2, 64)
    assert [(r.label, r.mode, r.rank) for r in rows] == [
        ("LoRA r", "replicated", 64),
        ("BD r", "block_diagonal", 64),
        ("BD 2r", "block_diagonal", 128),
        ("BD 4r", "block_diagonal", 256),
        ("BD matched", "block_diagonal", 96),
    ]
    assert rows[0].ratio == 1.0
    assert rows[-1].ratio == pytest.approx(44_826_624 / 45_088_768)


def test_match_bd_rank_rejects_a_budget_below_one_bd_step():
    with pytest.raises(ValueError, match="no BD rank fits"):
        match_bd_rank(BUILTIN_CONFIGS["llama-3.1-8b"], ALL, 8, 1)


@pytest.mark.parametrize(
    "targets, message",
    [(("q_proj", "x_proj"), "unknown LoRA target"), (("q_proj", "q_proj"), "more than once"), ((), "no LoRA targets")],
)
def test_count_parameters_rejects_bad_targets(targets, message):
    with pytest.raises(ValueError, match=message):
        count_parameters(LLAMA_3_2_1B, targets, "replicated", 8)


def test_count_parameters_names_the_projection_when_rank_is_not_divisible():
    with pytest.raises(ValueError, match="q_proj.*rank=12 is not divisible by nblocks=8"):
        count_parameters(BUILTIN_CONFIGS["llama-3.1-8b"], ALL, "block_diagonal", 12, 8)


@pytest.mark.parametrize(
    "model, ratios", [("llama-3.1-8b", ("0.8625", "1.725")), ("llama-3.1-70b", ("0.8703", "1.741"))]
)
def test_cli_table_shows_paper_ratios(model, ratios):
    res = _run_cli("--model", model, "--nblocks", "8", "--rank", "16")
    assert res.returncode == 0, res.stderr
    for label in ("LoRA r", "BD r", "BD 2r", "BD 4r", "BD matched"):
        assert label in res.stdout
    for ratio in ratios:
        assert ratio in res.stdout


def test_cli_json_from_hf_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(LLAMA_3_2_1B, model_type="llama")))
    res = _run_cli("--hf-config", str(path), "--nblocks", "2", "--rank", "64", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["matched_rank"] == 96 and out["nblocks"] == 2 and out["lora_rank"] == 64
    assert out["num_layers"] == 16 and out["targets"] == list(ALL)
    rows = {r["label"]: r for r in out["rows"]}
    assert rows["LoRA r"]["parameters"] == 45_088_768
    assert rows["BD matched"]["parameters"] == 44_826_624
    assert set(rows["BD 2r"]) == {"label", "mode", "rank", "parameters", "ratio"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "llama-9"], "invalid choice: 'llama-9'"),
        (["--hf-config", "/nonexistent/config.json"], "cannot read HF config"),
        (["--hf-config", "{bad_json}"], "not valid JSON"),
        (["--model", "llama-3.1-8b", "--targets", "q_proj,foo_proj"], "unknown LoRA target(s) ['foo_proj']"),
        (["--model", "llama-3.1-8b", "--nblocks", "8", "--rank", "0"], "rank"),
    ],
)
def test_cli_bad_input_exits_nonzero_with_message_and_no_traceback(tmp_path, args, message, capsys):
    """main() in this process (the CLI runs above cover the process exit): bad input ends in argparse's exit 2 with
    the message, never another exception (which the CLI would print as a traceback)."""
    cli = load_tool("rank_match")
    bad_json = tmp_path / "config.json"
    bad_json.write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        cli.main([a.replace("{bad_json}", str(bad_json)) for a in args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_rows_without_a_block_divisible_rank_are_left_out():
    """LoRA rank 8 at N=3: BD r, 2r and 4r are not multiples of 3, only the matched rank (12) is listed."""
    rows = comparison_rows(BUILTIN_CONFIGS["smollm2-135m"], ALL, 3, 8)
    assert [(r.label, r.rank) for r in rows] == [("LoRA r", 8), ("BD matched", 12)]
    # SmolLM2: d 576, ffn 1536, 9 heads x 64, 3 KV heads x 64, 30 layers
    q, kv, o, gu, down = (576, 576), (576, 192), (576, 576), (576, 1536), (1536, 576)
    bd = (
        30
        * 12
        * (
            q[0]
            + q[1] / 3
            + 2 * (kv[0] + kv[1] / 3)
            + o[0] / 3
            + o[1]
            + 2 * (gu[0] + gu[1] / 3)
            + down[0] / 3
            + down[1]
        )
    )
    assert rows[1].parameters == bd
