"""tools/bench_decode_step.py on a tiny random Llama: both systems decode the same batch, steps alternate, and the
greedy tokens of our engine equal transformers' (the check that the two step times are of the same computation)."""

from __future__ import annotations

import json

import pytest
from tool_module import load_tool

TINY = ("--model", "random", "--layers", "2", "--hidden", "64", "--intermediate", "96", "--heads", "8", "--kv-heads",
        "4", "--num-requests", "3", "--prompt-len", "4,9", "--threads", "1")


@pytest.mark.slow
def test_alternating_steps_of_the_same_batch_with_equal_greedy_tokens(tmp_path, capfd):
    out = tmp_path / "step.json"
    assert load_tool("bench_decode_step").main(["--pairs", "4", "--json", str(out), *TINY]) == 0
    data = json.loads(out.read_text())
    run, summary = data["run"], data["summary"]
    assert len(run["ours_s"]) == len(run["transformers_s"]) == summary["pairs"] == 4
    assert all(t > 0 for t in run["ours_s"] + run["transformers_s"])
    assert summary["requests"] == 3 and summary["compared_tokens_per_request"] == 4 + 3  # warm-up pairs included
    assert summary["requests_with_equal_greedy_tokens"] == 3, (run["ours_tokens"], run["transformers_tokens"])
    ratios = [a / b for a, b in zip(run["ours_s"], run["transformers_s"])]
    assert min(ratios) <= summary["ratio"]["median"] <= max(ratios)
    assert "ours / transformers per pair" in capfd.readouterr().out


def test_bad_pairs_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_tool("bench_decode_step").main(["--pairs", "0"])
    assert exit_.value.code == 2 and "--pairs must be >= 1, got 0" in capsys.readouterr().err
