"""The generation CLI under torchrun: one JSON object per prompt, greedy tokens of the real SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.multi_rank
@pytest.mark.slow
def test_generate_cli_prints_one_json_object_per_prompt():
    from megatron_bdlora.base_models import ensure_megatron_base, resolve_hf_base

    meg = ensure_megatron_base(resolve_hf_base("smollm2-135m-instruct"), 1)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "megatron_bdlora.generate",
        "--megatron-dir",
        str(meg),
        "--prompt",
        "What is the capital of France?",
        "--prompt",
        "Name a primary color.",
        "--chat",
        "--max-new-tokens",
        "8",
        "--greedy",
        "--json",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in records] == ["What is the capital of France?", "Name a primary color."]
    assert all(1 <= len(r["token_ids"]) <= 8 and isinstance(r["text"], str) for r in records)
    assert "Paris" in records[0]["text"]


def test_generate_cli_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "megatron_bdlora.generate", "--megatron-dir", str(tmp_path), "--prompt", "hi"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not a megatron checkpoint" in proc.stderr
