"""Fine-tuning runs under torchrun: loss falls, exact resume, crash-safe checkpoints, clear errors for bad
configuration, and the SmolLM2 TP=3 run whose adapter also helps in transformers + PEFT. TP / DP / accumulation
invariance and every sharding mode: test_train_gradients.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from training_runs import TINY, losses, train

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = ROOT / "configs" / "smollm2-135m-bdlora-tp3.yaml"


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(adapter_dir.glob("rank_*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="module")
def text_data(demo_data) -> list[str]:
    return [f"data.train={demo_data / 'milton' / 'train.txt'}", f"data.valid={demo_data / 'milton' / 'valid.txt'}"]


@pytest.mark.multi_rank
@pytest.mark.slow
def test_resume_after_a_crash_mid_checkpoint_continues_exactly(tmp_path, text_data, monkeypatch, capsys):
    """16 steps straight vs the same run killed while writing its step-16 checkpoint, then resumed from step 8;
    resuming at another layout is refused before any process group, and its way out (a new run from the adapter at
    another TP) carries the weights over exactly."""
    common = text_data + ["schedule.train_steps=16", "checkpoint.every=8", "logging.progress=false"]
    straight = tmp_path / "straight"
    proc = train(2, TINY, common + [f"logging.dir={straight}"])
    want = losses(straight)
    assert len(want) == 16 and all(math.isfinite(x) for x in want) and "done: step 16" in proc.stdout
    assert sum(want[-3:]) / 3 < sum(want[:3]) / 3 - 0.05, f"loss did not fall: {want}"
    manifest = json.loads((straight / "adapter" / "adapter_manifest.json").read_text())
    assert (manifest["mode"], manifest["tp"], manifest["nblocks"]) == ("block_diagonal", 2, 2)
    assert sorted(p.name for p in (straight / "adapter").glob("rank_*.safetensors")) == [
        "rank_00.safetensors",
        "rank_01.safetensors",
    ]
    crashed = tmp_path / "crashed"
    proc = train(
        2,
        TINY,
        common + [f"logging.dir={crashed}"],
        env={"MEGATRON_BDLORA_FAULT": "checkpoint-mid-write:16"},
        check=False,
    )
    assert proc.returncode != 0, "the injected crash did not happen"
    ckpts = crashed / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000008", "a half-written checkpoint was published"
    assert (ckpts / "step_000016.tmp").is_dir() and not (ckpts / "step_000016").exists()

    code, err = _train_main(["--resume", *common, f"logging.dir={crashed}", "parallel.tp=1"], 1, monkeypatch, capsys)
    assert code == 2, err[-2000:]
    assert "at tp=1 x dp=1 (world size 1): it was written at tp=2 x dp=1 (world size 2)" in err, err[-2000:]
    assert f"lora.init={ckpts / 'step_000008' / 'adapter'}" in err

    train(2, TINY, common + [f"logging.dir={crashed}"], resume=True)
    got = losses(crashed)
    # the crashed run logged steps 1-16, then the resumed run logged 9-16 again
    assert got[:16] == want and len(got) == 24
    assert max(abs(a - b) for a, b in zip(got[16:], want[8:])) <= 1e-6, f"{got[16:]} vs {want[8:]}"
    a, b = adapter_tensors(straight / "adapter"), adapter_tensors(crashed / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the way out: start at TP=1 from the TP=2 adapter (lr 0: the step changes nothing); other settings are refused
    from megatron_bdlora.checkpoint.adapters import load_native

    init = [f"lora.init={straight / 'adapter'}", "parallel.tp=1", "schedule.train_steps=1", "schedule.warmup_steps=0"]
    code, err = _train_main([*text_data, *init, "lora.rank=4"], 1, monkeypatch, capsys)
    assert code == 2 and "other LoRA settings" in err and "'rank': (8, 4)" in err, err[-2000:]
    restarted = tmp_path / "restarted"
    train(1, TINY, text_data + init + ["optimizer.lr=0", "checkpoint.every=0", f"logging.dir={restarted}"])
    before, after = load_native(straight / "adapter"), load_native(restarted / "adapter")
    assert after.tp == 1 and before.factors.keys() == after.factors.keys()
    assert all(torch.equal(x, y) for k in before.factors for x, y in zip(before.factors[k], after.factors[k]))


def _train_main(args: list[str], world: int, monkeypatch, capsys) -> tuple[int, str]:
    """megatron_bdlora.train's main in this process, as rank 0 of `world` (config errors come before any group)."""
    from megatron_bdlora.train import main

    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = main(["--config", str(TINY), *args])
    assert not torch.distributed.is_initialized(), "a process group was created before the error"
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.ranks=8"], "unknown config key(s) ['lora.ranks']"),
        (
            ["parallel.tp=3", "lora.nblocks=3", "parallel.global_batch_size=6"],
            "tp=3 does not divide num_attention_heads=4",
        ),
        (["lora.nblocks=3"], "lora.nblocks=3 is not a multiple of parallel.tp=2"),
        (["data.train=/nonexistent/train.txt"], "data file /nonexistent/train.txt does not exist"),
    ],
)
def test_bad_configuration_fails_before_any_process_group(overrides, message, text_data, monkeypatch, capsys):
    code, err = _train_main(text_data + overrides, 3 if "parallel.tp=3" in overrides else 2, monkeypatch, capsys)
    assert code == 2 and message in err, err[-2000:]


@pytest.mark.parametrize(
    "config",
    sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("serve-")),
    ids=lambda p: p.stem,
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


def test_empty_data_set_is_rejected_by_name(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, err = _train_main([f"data.train={empty}", "data.valid=null"], 2, monkeypatch, capsys)
    assert code == 2 and str(empty) in err, err[-2000:]


@pytest.mark.multi_rank
@pytest.mark.slow
def test_bfloat16_run_trains_and_its_adapter_is_saved_and_exported_to_peft_exactly(tmp_path, text_data):
    """model.dtype=bfloat16 through DeepSpeed (bf16 parameters, float32 master weights in the optimizer): the loss
    falls, the adapter is saved as bfloat16 (the manifest says so), and its PEFT export holds the same bits, which
    PEFT loads without loss (it upcasts to the base model's float32) and which move the logits."""
    import yaml
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from megatron_bdlora.base_models import resolve_hf_base
    from megatron_bdlora.checkpoint.adapters import load_native
    from megatron_bdlora.checkpoint.peft import export_peft_directory

    run = tmp_path / "bf16"
    train(
        2,
        TINY,
        text_data
        + [
            f"logging.dir={run}",
            "model.dtype=bfloat16",
            "schedule.train_steps=16",
            "checkpoint.every=0",
            "logging.progress=false",
        ],
    )
    got = losses(run)
    assert len(got) == 16 and sum(got[-3:]) / 3 < sum(got[:3]) / 3, f"bf16 loss did not fall: {got}"
    assert json.loads((run / "adapter" / "adapter_manifest.json").read_text())["dtype"] == "bfloat16"
    ckpt = load_native(run / "adapter")
    assert all(t.dtype == torch.bfloat16 for pair in ckpt.factors.values() for t in pair)
    export_peft_directory(run / "adapter", tmp_path / "peft")
    exported = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    hf_dir = resolve_hf_base("smollm2-135m-instruct", yaml.safe_load(TINY.read_text())["model"]["random_config"], 1234)
    base = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    loaded = dict(model.named_parameters())
    for (layer, proj), pair in ckpt.factors.items():
        module = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{module}.{proj}"
        for factor, want in zip("AB", pair):
            saved = exported[f"{prefix}.lora_{factor}.weight"]
            assert saved.dtype == torch.bfloat16 and torch.equal(saved, want), f"{prefix} lora_{factor} export"
            assert torch.equal(loaded[f"{prefix}.lora_{factor}.default.weight"], want.float()), (
                f"{prefix} lora_{factor} in PEFT"
            )
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base_logits).abs().max() > 1e-4, (
            "the trained adapter does not move the logits"
        )
    # loaded back into a bfloat16 model at TP=1 (resharded from TP=2): every rank-0 slice holds the saved bits
    from megatron_bdlora.local_ranks import run_distributed

    state = run_distributed(load_back_worker, 1, hf_dir, run / "adapter")[0]
    for (layer, proj), pair in ckpt.factors.items():
        for factor, want in zip("AB", pair):
            got = state[f"layers.{layer}.{proj}.lora_{factor}"]
            assert got.dtype == torch.bfloat16 and torch.equal(got, want), (
                f"layers.{layer}.{proj}.lora_{factor} loaded back"
            )


def load_back_worker(info, hf_dir, adapter_dir):
    """This rank's adapter slices after loading adapter_dir into a bfloat16 model (no base weights needed)."""
    from megatron_bdlora.generate import load_adapter_for_model
    from megatron_bdlora.model import adapter_state_dict, build_model

    hf_config = json.loads((hf_dir / "config.json").read_text())
    settings, load = load_adapter_for_model(adapter_dir, hf_config, info.tp_size, info.tp_rank)
    model = build_model(hf_config, info.tp_size, settings, "bfloat16")
    load(model)
    return adapter_state_dict(model)


@pytest.mark.multi_rank
@pytest.mark.slow
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
