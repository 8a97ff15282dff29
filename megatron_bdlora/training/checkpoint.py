"""Training checkpoints that are complete or absent: adapter (native format) + DeepSpeed optimiser/scheduler
state + data position + RNG states, written under `step_NNNNNN.tmp` and renamed when every rank is done.

Layout of `<dir>`:
    latest                     name of the newest complete checkpoint (replaced atomically)
    step_000050/adapter/       native adapter checkpoint (manifest + one file per TP rank)
    step_000050/deepspeed/     DeepSpeed engine state (optimizer, scheduler; frozen base excluded)
    step_000050/trainer/rank_NNNNN.pt   step, sampler position, RNG states of each global rank
    step_000050/trainer/layout.json     tp, dp and world size the checkpoint was written at
A run killed mid-write leaves only a `.tmp` directory, which resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

FAULT_ENV = "MEGATRON_BDLORA_FAULT"  # fault injection for tests: "checkpoint-mid-write:STEP" exits mid-save


def _tag(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(ckpt_dir) / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path


LAYOUT_FILE = "layout.json"


def check_resume_layout(ckpt_dir: str | Path, tp: int, dp: int) -> None:
    """Refuse, before any process group, to resume at another TP or DP size than the newest checkpoint's.

    DeepSpeed's ZeRO optimizer files are partitioned over the DP ranks that wrote them (it refuses another DP size
    itself, after minutes of start-up) and its model files are per TP rank; the adapter alone reshards exactly.
    """
    path = latest_checkpoint(ckpt_dir)
    if path is None or not (path / "trainer" / LAYOUT_FILE).is_file():
        return
    saved = json.loads((path / "trainer" / LAYOUT_FILE).read_text())
    if (saved["tp"], saved["dp"]) != (tp, dp):
        raise ValueError(
            f"cannot resume {path} at tp={tp} x dp={dp} (world size {tp * dp}): it was written at tp={saved['tp']} x "
            f"dp={saved['dp']} (world size {saved['world_size']}), and its optimizer state is partitioned for that. "
            f"Either resume with the same layout (torchrun --nproc_per_node {saved['world_size']} ... "
            f"parallel.tp={saved['tp']}), or start a new run from its adapter at any layout with "
            f"lora.init={path / 'adapter'} (the weights carry over exactly, the optimizer state and schedule restart)"
        )


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    engine,
    trainer_state: dict[str, Any],
    write_adapter,
    keep: int,
    layout: dict[str, int],
) -> Path:
    """Collective: every rank writes its part under a .tmp directory; rank 0 publishes it and prunes old ones.

    write_adapter(path): writes the native adapter directory at `path` (collective over TP; rank 0 writes).
    layout: {"tp", "dp", "world_size"} of the run, checked by check_resume_layout.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / _tag(step)
    tmp = ckpt_dir / f"{_tag(step)}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)
    (tmp / "trainer").mkdir(exist_ok=True)
    torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer" / f"rank_{rank:05d}.pt")
    if rank == 0:
        (tmp / "trainer" / LAYOUT_FILE).write_text(json.dumps(layout) + "\n")
    write_adapter(tmp / "adapter")
    _maybe_fault(step)
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer_tmp = ckpt_dir / "latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, ckpt_dir / "latest")
        _prune(ckpt_dir, keep)
    dist.barrier()
    return final


def _maybe_fault(step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec == f"checkpoint-mid-write:{step}":
        os._exit(17)  # simulated crash: files half written, nothing published


def _prune(ckpt_dir: Path, keep: int) -> None:
    complete = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old)
    for stale in ckpt_dir.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path, engine) -> dict[str, Any]:
    """Restore engine (optimizer, scheduler, adapter weights) and this rank's trainer state + RNG."""
    load_path, _ = engine.load_checkpoint(
        str(path), tag="deepspeed", load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed state missing under {path}/deepspeed")
    state = torch.load(path / "trainer" / f"rank_{dist.get_rank():05d}.pt", weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
