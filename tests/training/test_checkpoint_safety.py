"""Trainer checkpoints are safe to resume: their files load weights-only (a crafted pickle runs no code), every file
is on disk before the checkpoint is published, and --resume refuses, before any process group, a checkpoint whose
LoRA settings or base model differ from the config's, naming both values. Exact resume: test_train.py."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from training_runs import TINY, train

from megatron_bdlora.config_file import ConfigError
from megatron_bdlora.training.checkpoint import (
    UnsafeCheckpointError,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from megatron_bdlora.training.config import check_run_files, load_config

TINY_HF = {**yaml.safe_load(TINY.read_text())["model"]["random_config"], "vocab_size": 49152}


class WritesMarker:
    """A pickled object whose loading runs code: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "the of and to in that is was he for it with as his on be at by had not are but from".split()
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(40)) + "\n" for _ in range(100)))
    return path


def _config(run_dir: Path, train_file: Path, overrides: list[str] = ()):
    return load_config(TINY, [f"logging.dir={run_dir}", f"data.train={train_file}", "data.valid=null", *overrides])


@contextlib.contextmanager
def _one_rank_group(tmp_path: Path):
    """A world of one gloo rank in this process, destroyed on exit (save_checkpoint is a collective)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class FakeEngine:
    """DeepSpeed's save_checkpoint, writing one file (the trainer's side of a checkpoint is what is tested)."""

    def save_checkpoint(self, save_dir: str, tag: str, **_) -> None:
        (Path(save_dir) / tag).mkdir()
        torch.save({"module": {"w": torch.ones(2)}}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")


def _save(cfg, tmp_path: Path) -> Path:
    """A checkpoint of `cfg`'s LoRA settings (random factors) written by save_checkpoint at tp=2 x dp=1."""
    from megatron_bdlora.bench.workload import write_random_adapter

    settings, tp = cfg.lora.settings(cfg.seed), cfg.parallel.tp
    meta = {"tp": tp, "dp": 1, "world_size": tp, "base_model": {"path": "/models/base", "sha256": "0" * 64}}
    state = {"step": 5, "sampler": {"next_step": 5}, "history": [{"step": 5, "loss": 1.5, "clipped": False}]}
    with _one_rank_group(tmp_path):
        return save_checkpoint(cfg.checkpoint_dir(), 5, FakeEngine(), state,
                               lambda out: write_random_adapter(out, TINY_HF, settings, tp, seed=0), 2, meta)


def test_trainer_state_round_trips_through_a_weights_only_load(tmp_path):
    """Step, sampler, history and every RNG (numpy's cached Gaussian included) come back exactly."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves numpy's second Gaussian of a pair cached in its state
    state = {"step": 7, "sampler": {"next_step": 7, "seed": 1234}, "history": [{"loss": 2.5, "clipped": True}]}
    (tmp_path / "trainer").mkdir()
    torch.save({**state, "rng": rng_state()}, tmp_path / "trainer" / "rank_00003.pt")
    want = (random.random(), np.random.standard_normal(), np.random.randint(1 << 30), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)

    loaded = load_trainer_state(tmp_path, 3)
    set_rng_state(loaded.pop("rng"))
    assert loaded == state
    got = (random.random(), np.random.standard_normal(), np.random.randint(1 << 30), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])


def _load_deepspeed_file(file: Path):
    from megatron_bdlora.training.deepspeed_engine import load_deepspeed_file

    return load_deepspeed_file(file)


@pytest.mark.parametrize(
    "relative, load, zipped, holds",
    [
        ("trainer/rank_00000.pt", lambda file: load_trainer_state(file.parents[1], 0), True, "['io.open']"),
        ("trainer/rank_00000.pt", lambda file: load_trainer_state(file.parents[1], 0), False,
         "objects that torch cannot list (not a zip checkpoint)"),
        ("deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", _load_deepspeed_file, True, "['io.open']"),
    ],
    ids=["trainer", "trainer-legacy-serialization", "deepspeed"],
)
def test_a_crafted_pickle_is_refused_without_running_its_code(relative, load, zipped, holds, tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(WritesMarker(probe)))
    assert probe.is_file(), "the payload does not run code when unpickled: the test proves nothing"

    marker = tmp_path / "marker"
    file = tmp_path / "step_000001" / relative
    file.parent.mkdir(parents=True)
    torch.save({"step": 1, "payload": WritesMarker(marker)}, file, _use_new_zipfile_serialization=zipped)
    with pytest.raises(UnsafeCheckpointError) as err:
        load(file)
    assert f"refusing to load {file}: it holds {holds}" in str(err.value), err.value
    assert not marker.exists(), "loading the checkpoint ran the pickled code"


def test_every_file_is_fsynced_before_the_checkpoint_is_published(tmp_path, train_file, monkeypatch):
    """Each file and directory of step_N.tmp is flushed before the rename to step_N, the directory after it, and the
    `latest` pointer before it replaces the old one."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def rename(src, dst):
        real_rename(src, dst)
        events.append(("rename", str(src)))

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("replace", str(src)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    cfg = _config(tmp_path / "run", train_file)
    final = _save(cfg, tmp_path)
    ckpt_dir, tmp = final.parent, final.with_name(final.name + ".tmp")

    published = events.index(("rename", str(tmp)))
    flushed = {path for kind, path in events[:published] if kind == "fsync"}
    written = {str(tmp / p.relative_to(final)) for p in final.rglob("*")} | {str(tmp)}
    assert written - flushed == set(), "not fsynced before the rename"
    assert ("fsync", str(ckpt_dir)) in events[published:], "the rename itself was not made durable"
    pointer = events.index(("replace", str(ckpt_dir / "latest.tmp")))
    assert ("fsync", str(ckpt_dir / "latest.tmp")) in events[published:pointer]
    assert ("fsync", str(ckpt_dir)) in events[pointer:]
    assert (ckpt_dir / "latest").read_text() == final.name


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.rank=16", "lora.rank is 16 in the config but 8 in the checkpoint"),
        ("lora.targets=[q_proj,v_proj]", "lora.targets is ['q_proj', 'v_proj'] in the config but ['q_proj', 'k_proj', "
                                         "'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] in the checkpoint"),
        ("lora.alpha=32", "lora.alpha is 32.0 in the config but 16.0 in the checkpoint"),
        ("lora.nblocks=4", "lora.nblocks is 4 in the config but 2 in the checkpoint"),
        ("lora.mode=slora", "lora.mode is slora in the config but block_diagonal in the checkpoint; "
                            "lora.nblocks is None in the config but 2 in the checkpoint"),
    ],
)
def test_resume_with_other_lora_settings_is_refused_naming_both_values(override, message, tmp_path, train_file):
    run = tmp_path / "run"
    final = _save(_config(run, train_file), tmp_path)
    overrides = [override, "lora.nblocks=null"] if "mode" in override else [override]
    with pytest.raises(ConfigError) as err:
        check_run_files(_config(run, train_file, overrides), 2, resume=True)
    assert str(err.value).startswith(f"cannot resume {final}: {message} ("), err.value
    check_run_files(_config(run, train_file), 2, resume=True)  # the same settings resume


def test_checkpoint_of_the_earlier_pickled_format_is_refused_naming_its_files(tmp_path, train_file):
    run = tmp_path / "run"
    final = _save(_config(run, train_file), tmp_path)
    (final / "trainer" / "meta.json").unlink()
    with pytest.raises(ConfigError) as err:
        check_run_files(_config(run, train_file), 2, resume=True)
    assert f"{final / 'trainer' / 'meta.json'} is missing" in str(err.value)
    assert f"lora.init={final / 'adapter'}" in str(err.value)


# -- a real run: the command line refuses before start-up, DeepSpeed's files are read weights-only ---------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_file) -> tuple[Path, list[str]]:
    """A one-step TP=2 run with its checkpoint, and the overrides that made it."""
    run = tmp_path_factory.mktemp("run")
    common = [f"data.train={train_file}", "data.valid=null", "schedule.train_steps=1", "schedule.warmup_steps=0",
              "checkpoint.every=1", "logging.progress=false"]
    train(2, TINY, [*common, f"logging.dir={run}"])
    return run, common


def _resume_main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """megatron_bdlora.train's main with --resume in this process, as rank 0 of 2 (it must fail before any group)."""
    from megatron_bdlora.train import main
    from megatron_bdlora.training.loop import Trainer

    def start_up(*_) -> None:  # fails at once, where a missed check would wait for rank 1 in init_parallel
        raise AssertionError("the trainer started up: the checkpoint was not refused before any process group")

    monkeypatch.setattr(Trainer, "__init__", start_up)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["--config", str(TINY), "--resume", *args])
    assert not dist.is_initialized(), "a process group was created before the error"
    return code, capsys.readouterr().err


@pytest.mark.multi_rank
@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.rank=16", "lora.rank is 16 in the config but 8 in the checkpoint"),
        ("lora.targets=[q_proj,v_proj]", "lora.targets is ['q_proj', 'v_proj'] in the config but ['q_proj', 'k_proj', "
                                         "'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] in the checkpoint"),
    ],
)
def test_resume_command_refuses_other_lora_settings_before_start_up(override, message, trained, monkeypatch, capsys):
    run, common = trained
    code, err = _resume_main([*common, f"logging.dir={run}", override], monkeypatch, capsys)
    assert code == 2 and f"cannot resume {run / 'checkpoints' / 'step_000001'}: {message}" in err, err[-2000:]


@pytest.mark.multi_rank
@pytest.mark.slow
def test_resume_command_refuses_another_base_model_before_start_up(trained, monkeypatch, capsys):
    """Another seed makes another random base of the same shape: only the recorded hash tells them apart."""
    run, common = trained
    saved = json.loads((run / "checkpoints" / "step_000001" / "trainer" / "meta.json").read_text())["base_model"]
    code, err = _resume_main([*common, f"logging.dir={run}", "seed=4321"], monkeypatch, capsys)
    assert code == 2, err[-2000:]
    assert f"but {saved['path']} (sha256 {saved['sha256']}) in the checkpoint" in err, err[-2000:]
    assert "model.base=smollm2-135m-instruct is " in err and err.count("sha256") == 2, err[-2000:]


@pytest.mark.multi_rank
@pytest.mark.slow
def test_resume_refuses_a_crafted_deepspeed_file_without_running_its_code(trained, tmp_path):
    run, common = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    crafted = copy / "checkpoints" / "step_000001" / "deepspeed" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "marker"
    torch.save({"module": {}, "payload": WritesMarker(marker)}, crafted)
    proc = train(2, TINY, [*common, f"logging.dir={copy}"], check=False, resume=True)
    assert proc.returncode != 0 and f"refusing to load {crafted}" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists(), "resuming ran the pickled code"
