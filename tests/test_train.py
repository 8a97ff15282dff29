"""Fine-tuning runs under torchrun: loss falls, exact resume, crash-safe checkpoints, clear errors for bad
configuration, and the SmolLM2 TP=3 run whose adapter also helps in transformers + PEFT. TP / DP / accumulation
invariance and every sharding mode: test_train_gradients.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-llama-bdlora-tp2.yaml"
SMOLLM2 = ROOT / "configs" / "smollm2-135m-bdlora-tp3.yaml"


def train(nproc: int, config: Path, overrides: list[str], env: dict | None = None, check: bool = True, resume: bool = False):
    """Run `torchrun --nproc_per_node nproc -m megatron_bdlora.train` and return the completed process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_bdlora.train", "--config", str(config), *(["--resume"] if resume else []), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(adapter_dir.glob("rank_*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="module")
def text_data(demo_data) -> list[str]:
    return [f"data.train={demo_data / 'milton' / 'train.txt'}", f"data.valid={demo_data / 'milton' / 'valid.txt'}"]


def test_resume_after_a_crash_mid_checkpoint_continues_exactly(tmp_path, text_data):
    """10 steps straight vs the same run killed while writing its step-10 checkpoint, then resumed from step 5."""
    common = text_data + ["schedule.train_steps=10", "checkpoint.every=5", "logging.progress=false"]
    straight = tmp_path / "straight"
    proc = train(2, TINY, common + [f"logging.dir={straight}"])
    want = losses(straight)
    assert len(want) == 10 and all(math.isfinite(x) for x in want) and "done: step 10" in proc.stdout
    assert sum(want[-3:]) / 3 < sum(want[:3]) / 3 - 0.05, f"loss did not fall: {want}"
    manifest = json.loads((straight / "adapter" / "adapter_manifest.json").read_text())
    assert (manifest["mode"], manifest["tp"], manifest["nblocks"]) == ("block_diagonal", 2, 2)
    assert sorted(p.name for p in (straight / "adapter").glob("rank_*.safetensors")) == ["rank_00.safetensors", "rank_01.safetensors"]
    crashed = tmp_path / "crashed"
    proc = train(2, TINY, common + [f"logging.dir={crashed}"], env={"MEGATRON_BDLORA_FAULT": "checkpoint-mid-write:10"}, check=False)
    assert proc.returncode != 0, "the injected crash did not happen"
    ckpts = crashed / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000005", "a half-written checkpoint was published"
    assert (ckpts / "step_000010.tmp").is_dir() and not (ckpts / "step_000010").exists()
    train(2, TINY, common + [f"logging.dir={crashed}"], resume=True)
    got = losses(crashed)
    # the crashed run logged steps 1-10, then the resumed run logged 6-10 again
    assert got[:10] == want and len(got) == 15
    assert max(abs(a - b) for a, b in zip(got[10:], want[5:])) <= 1e-6, f"{got[10:]} vs {want[5:]}"
    a, b = adapter_tensors(straight / "adapter"), adapter_tensors(crashed / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.ranks=8"], "unknown config key(s) ['lora.ranks']"),
        (["parallel.tp=3", "lora.nblocks=3", "parallel.global_batch_size=6"], "tp=3 does not divide num_attention_heads=4"),
        (["lora.nblocks=3"], "lora.nblocks=3 is not a multiple of parallel.tp=2"),
        (["data.train=/nonexistent/train.txt"], "data file /nonexistent/train.txt does not exist"),
    ],
)
def test_bad_configuration_fails_before_any_process_group(overrides, message, text_data):
    cmd = [sys.executable, "-m", "megatron_bdlora.train", "--config", str(TINY), *text_data, *overrides]
    world = "3" if "parallel.tp=3" in overrides else "2"
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "WORLD_SIZE": world})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "init_process_group" not in proc.stderr


@pytest.mark.parametrize(
    "config", sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("serve-")), ids=lambda p: p.stem
)
def test_missing_data_file_of_a_shipped_config_says_how_to_make_it(config, demo_data, tmp_path, monkeypatch, capsys):
    """Started where its data does not exist, every shipped config fails naming file, key and the command that
    writes it; for the demo corpora that command's real output (prepare_data's manifest) holds exactly that file."""
    from megatron_bdlora.train import main
    from megatron_bdlora.training.config import load_config

    cfg = load_config(config)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", str(cfg.parallel.tp))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"data file {cfg.data.train} does not exist (data.train)" in err and "Traceback" not in err, err
    train = Path(cfg.data.train)
    if train.is_absolute():  # the user's own data: the message says what to put there
        assert "python tools/prepare_data.py --out-dir data" in err and '{"messages": [...]}' in err
    else:
        assert f"`python tools/prepare_data.py --out-dir {train.parts[0]}`" in err
        manifest = json.loads((demo_data / "manifest.json").read_text())
        assert train.relative_to(train.parts[0]).as_posix() in manifest["files"]


def test_empty_data_set_is_rejected_by_name(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cmd = [sys.executable, "-m", "megatron_bdlora.train", "--config", str(TINY), f"data.train={empty}", "data.valid=null"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "WORLD_SIZE": "2"})
    assert proc.returncode == 2 and str(empty) in proc.stderr and "Traceback" not in proc.stderr


def test_smollm2_tp3_adapter_lowers_held_out_perplexity_in_peft_too(tmp_path, text_data, demo_data):
    """The shipped default config at TP=3 (short run); its BD adapter, exported to PEFT, helps in transformers."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megatron_bdlora.base_models import resolve_hf_base
    from megatron_bdlora.checkpoint.peft import export_peft_directory

    run = tmp_path / "smol"
    train(3, SMOLLM2, text_data + [f"logging.dir={run}", "schedule.train_steps=6", "schedule.warmup_steps=1",
                                   "checkpoint.every=0", "data.seq_length=64", "logging.eval_batches=2"])
    got = losses(run)
    assert sum(got[-2:]) / 2 < sum(got[:2]) / 2, f"loss did not fall: {got}"
    export_peft_directory(run / "adapter", tmp_path / "peft")
    hf_dir = resolve_hf_base("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = (demo_data / "milton" / "valid.txt").read_text()[:6000]
    ids = tok(text, return_tensors="pt")["input_ids"][:, :512]

    def ppl(model) -> float:
        with torch.no_grad():
            return math.exp(model(input_ids=ids, labels=ids).loss.item())

    base = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    before = ppl(base)
    after = ppl(PeftModel.from_pretrained(base, tmp_path / "peft").eval())
    assert after < before * 0.98, f"held-out perplexity in transformers + PEFT: base {before:.3f}, adapted {after:.3f}"
