"""Training checkpoints that are complete or absent: adapter (native format) + DeepSpeed optimiser/scheduler
state + data position + RNG states, written under `step_NNNNNN.tmp` and renamed when every rank is done.

Layout of `<dir>`:
    latest                     name of the newest complete checkpoint (replaced atomically)
    step_000050/adapter/       native adapter checkpoint (manifest + one file per TP rank)
    step_000050/deepspeed/     DeepSpeed engine state (optimizer, scheduler; frozen base excluded)
    step_000050/trainer/rank_NNNNN.pt   step, sampler position, RNG states of each global rank (tensors and
                                        plain values only: read with torch.load(weights_only=True))
    step_000050/trainer/meta.json       format version; tp, dp and world size; base model path and sha256
A run killed mid-write leaves only a `.tmp` directory, which resume ignores and the next save removes. Every file
and directory is fsynced before the rename, so a published checkpoint is complete after a power loss too.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from megatron_bdlora.checkpoint.adapters import MANIFEST_NAME, canonical_targets, read_manifest, settings_from_manifest
from megatron_bdlora.config import LoRASettings

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


META_FILE = "meta.json"
# 2: trainer state of tensors and plain values (weights_only), base model hash. 1 (no meta.json) pickled numpy.
META_VERSION = 2


def _read_meta(path: Path) -> dict[str, Any]:
    """The newest checkpoint's meta.json; a checkpoint of an earlier format is refused naming what to do instead."""
    meta_file = path / "trainer" / META_FILE
    if not meta_file.is_file():
        raise ValueError(
            f"cannot resume {path}: {meta_file} is missing, so it was written by an earlier version of the trainer, "
            f"whose {path / 'trainer'}/rank_*.pt files need pickle's arbitrary code execution to load. Start a new "
            f"run from its adapter instead with lora.init={path / 'adapter'} (the weights carry over exactly, the "
            "optimizer state and schedule restart)"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != META_VERSION:
        raise ValueError(f"cannot resume {path}: {meta_file} has format_version "
                         f"{meta.get('format_version')!r}, this trainer reads {META_VERSION}")
    return meta


def check_resume(ckpt_dir: str | Path, tp: int, dp: int, settings: LoRASettings) -> None:
    """Refuse, before any process group, to resume the newest checkpoint at another TP or DP size or with other LoRA
    settings; the base model is checked by check_resume_base once it is resolved."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return
    _check_layout(path, _read_meta(path), tp, dp)
    _check_lora_settings(path, settings, tp)


def _check_layout(path: Path, saved: dict[str, Any], tp: int, dp: int) -> None:
    """DeepSpeed's ZeRO optimizer files are partitioned over the DP ranks that wrote them (it refuses another DP size
    itself, after minutes of start-up) and its model files are per TP rank; the adapter alone reshards exactly."""
    if (saved["tp"], saved["dp"]) != (tp, dp):
        raise ValueError(
            f"cannot resume {path} at tp={tp} x dp={dp} (world size {tp * dp}): it was written at tp={saved['tp']} x "
            f"dp={saved['dp']} (world size {saved['world_size']}), and its optimizer state is partitioned for that. "
            f"Either resume with the same layout (torchrun --nproc_per_node {saved['world_size']} ... "
            f"parallel.tp={saved['tp']}), or start a new run from its adapter at any layout with "
            f"lora.init={path / 'adapter'} (the weights carry over exactly, the optimizer state and schedule restart)"
        )


def _check_lora_settings(path: Path, settings: LoRASettings, tp: int) -> None:
    """The adapter's shapes and scaling fix what the optimizer state means: every setting that changes them must be
    the checkpoint's (its manifest records them)."""
    saved = settings_from_manifest(read_manifest(path / "adapter"))
    want, got = _resume_fields(settings, tp), _resume_fields(saved, tp)
    diff = [f"lora.{name} is {want[name]} in the config but {got[name]} in the checkpoint"
            for name in want if want[name] != got[name]]
    if diff:
        raise ValueError(f"cannot resume {path}: " + "; ".join(diff) + f" ({path / 'adapter' / MANIFEST_NAME})")


def _resume_fields(settings: LoRASettings, tp: int) -> dict[str, Any]:
    """The LoRA settings a resumed run must share with its checkpoint, as the config spells them."""
    return {
        "rank": settings.rank,
        "alpha": settings.alpha,
        "use_rslora": settings.use_rslora,
        "mode": settings.mode.value,
        "nblocks": settings.nblocks_for(tp),
        "targets": list(canonical_targets(settings.targets)),
    }


FINGERPRINT_SAMPLES = 64  # evenly spaced reads per weight file
FINGERPRINT_CHUNK = 1 << 16  # bytes per read: 4 MiB per file in all, whatever the model's size


def base_model_identity(hf_dir: Path) -> dict[str, str]:
    """The base model a run trains on: its directory and a sha256 fingerprint of its config.json, each weight file's
    size and safetensors header (names, shapes, dtypes) and FINGERPRINT_SAMPLES evenly spaced chunks of its bytes.

    A resumed run refuses another model, another fine-tune of the same shape included (two trainings differ in
    every chunk), without reading 140 GB of a 70B base on every rank at every resume."""
    digest = hashlib.sha256((hf_dir / "config.json").read_bytes())
    for file in sorted(hf_dir.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, size)))
            for i in range(FINGERPRINT_SAMPLES):
                f.seek(size * i // FINGERPRINT_SAMPLES)
                digest.update(f.read(FINGERPRINT_CHUNK))
    return {"path": str(hf_dir), "sha256": digest.hexdigest()}


def check_resume_base(ckpt_dir: str | Path, hf_dir: Path, base_key: str) -> None:
    """Refuse to resume the newest checkpoint on another base model than the one it was trained on (before any
    process group: the trainer calls it once model.base is resolved)."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return
    saved = _read_meta(path)["base_model"]
    current = base_model_identity(hf_dir)
    if saved["sha256"] != current["sha256"]:
        raise ValueError(
            f"cannot resume {path}: model.base={base_key} is {current['path']} (sha256 {current['sha256']}) in the "
            f"config but {saved['path']} (sha256 {saved['sha256']}) in the checkpoint"
        )


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, which torch.load(weights_only=True) reads back."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # keys: uint32 ndarray [624]
    state = {
        "python": random.getstate(),  # (version, tuple of ints, None or float)
        "numpy": {"keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() saved."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that only pickle's arbitrary code execution could load."""


def load_weights_only(file: str | Path, safe_globals: Iterable[Any] = (), map_location: Any = None) -> Any:
    """torch.load that builds only tensors, plain values and the classes in safe_globals: a crafted file cannot run
    code; one that needs anything else is refused naming the file and what it holds."""
    allowed = list(safe_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeCheckpointError(
            f"refusing to load {file}: it holds {_disallowed_globals(file, allowed)}, which only pickle's arbitrary "
            "code execution can build (a file written by an earlier version of this trainer, or not by it at all)"
        ) from None


def _disallowed_globals(file: str | Path, allowed: list[Any]) -> str:
    """The classes and functions a refused file names beyond the allowed ones, as torch lists them."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except ValueError:  # torch lists zip checkpoints only, not its legacy format or a bare pickle
        return "objects that torch cannot list (not a zip checkpoint)"
    names = {f"{g.__module__}.{g.__qualname__}" for g in allowed}
    return str([g for g in found if g not in names])


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    engine,
    trainer_state: dict[str, Any],
    write_adapter,
    keep: int,
    meta: dict[str, Any],
) -> Path:
    """Collective: every rank writes its part under a .tmp directory; rank 0 publishes it and prunes old ones.

    write_adapter(path): writes the native adapter directory at `path` (collective over TP; rank 0 writes).
    meta: {"tp", "dp", "world_size", "base_model": base_model_identity(...)} of the run, checked on resume.
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
        (tmp / "trainer" / META_FILE).write_text(json.dumps({"format_version": META_VERSION, **meta}) + "\n")
    write_adapter(tmp / "adapter")
    _maybe_fault(step)
    dist.barrier()
    _fsync_tree(tmp)  # every rank: on a shared file system only the writer's fsync is sure to reach the disk
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(ckpt_dir)
        pointer_tmp = ckpt_dir / "latest.tmp"
        pointer_tmp.write_text(final.name)
        _fsync(pointer_tmp)
        os.replace(pointer_tmp, ckpt_dir / "latest")
        _fsync(ckpt_dir)
        _prune(ckpt_dir, keep)
    dist.barrier()
    return final


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename is durable once its directory is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under root, then each directory after its contents."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


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


def load_trainer_state(path: Path, rank: int) -> dict[str, Any]:
    """A global rank's step, sampler position, history and RNG states, read without running any pickled code."""
    return load_weights_only(path / "trainer" / f"rank_{rank:05d}.pt")


def load_checkpoint(path: Path, engine) -> dict[str, Any]:
    """Restore engine (optimizer, scheduler, adapter weights) and this rank's trainer state + RNG."""
    state = load_trainer_state(path, dist.get_rank())  # first: a refused file stops the resume before DeepSpeed's
    load_path, _ = engine.load_checkpoint(
        str(path), tag="deepspeed", load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed state missing under {path}/deepspeed")
    set_rng_state(state.pop("rng"))
    return state
