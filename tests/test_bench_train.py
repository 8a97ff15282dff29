"""tools/bench_train.py end to end at one SmolLM2 layer, TP=3: every variant steps, adapters are parameter-matched,
and the collectives each mode adds to a training step are the ones the sharding plan implies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_training_step_collectives_and_matched_parameters(tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), "--tp", "3", "--layers", "1",
                           "--repeats", "1", "--seq-length", "16", "--micro-batch", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"base", "block_diagonal", "slora", "replicated"}
    assert all(r["step_ms"] > 0 for r in rows.values())
    count = {name: sum(r["collectives"].values()) for name, r in rows.items()}
    # one layer: S-LoRA adds, per column->row pair (qkv->o, gate/up->down), an all-gather and an all-reduce forward
    # and a reduce-scatter and an all-reduce backward; replicated adds one gradient all-reduce per replicated factor
    # (A of q, k, v, gate, up; B of o, down); BD adds nothing but the optimizer's own (as the others do)
    assert count["slora"] - count["block_diagonal"] == 2 * 4
    assert count["replicated"] - count["block_diagonal"] == 7
    assert rows["slora"]["collectives"].get("all_gather_into_tensor", 0) + rows["slora"]["collectives"].get("all_gather", 0) == 2
    lora = rows["slora"]["parameters"]
    assert rows["replicated"]["parameters"] == lora and 0 < rows["block_diagonal"]["parameters"] <= lora
    assert rows["block_diagonal"]["rank"] > rows["slora"]["rank"]  # BD buys its matched count back with rank
    assert rows["base"]["parameters"] == 0 and "frozen base" in proc.stdout
