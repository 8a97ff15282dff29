"""Fine-tuning runs under torchrun for the training tests (test_train.py, test_train_gradients.py): the tiny
config, one run of `torchrun -m megatron_bdlora.train`, and the losses it logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-llama-bdlora-tp2.yaml"


def train(
    nproc: int, config: Path, overrides: list[str], env: dict | None = None, check: bool = True, resume: bool = False
):
    """Run `torchrun --nproc_per_node nproc -m megatron_bdlora.train` and return the completed process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_bdlora.train", "--config", str(config), *(["--resume"] if resume else []), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
