"""Native adapter checkpoints, PEFT import/export and resharding, with PEFT itself as the reference.

A tiny random Llama (hidden 64, 8 heads, 4 KV heads, ffn 128, 2 layers) gets PEFT adapters with random
non-zero factors: BD-LoRA (nblocks 4), plain LoRA, and plain LoRA whose factors are exactly block-diagonal.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tool_module import load_tool

from megatron_bdlora.checkpoint.adapters import (
    AdapterCheckpointError,
    check_same_settings,
    load_native,
    rank_file_name,
    read_manifest,
    save_native,
    save_native_rank_states,
)
from megatron_bdlora.checkpoint.peft import export_peft, import_peft, import_peft_directory
from megatron_bdlora.checkpoint.reader import read_adapter
from megatron_bdlora.checkpoint.reshard import reshard, reshard_directory
from megatron_bdlora.config import ALL_TARGETS, COLUMN_TARGETS, ROW_TARGETS, LoRASettings
from megatron_bdlora.targets import lora_plan

REPO = Path(__file__).resolve().parents[2]
NBLOCKS = 4
BD = dict(target_modules_bd_a=list(ROW_TARGETS), target_modules_bd_b=list(COLUMN_TARGETS), nblocks=NBLOCKS)
CONFIG_FIELDS = ("r", "lora_alpha", "use_rslora", "lora_dropout", "bias", "fan_in_fan_out", "use_bdlora")


def _fill_random(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _make_peft(base, out: Path, seed: int, r: int = 8, bd: bool = True, block_diagonal_plain: bool = False) -> Path:
    """Save a PEFT adapter with random non-zero factors (block_diagonal_plain: plain LoRA, BD-shaped factors)."""
    cfg = peft.LoraConfig(
        r=r, lora_alpha=16, target_modules=list(ALL_TARGETS), use_bdlora=peft.BdLoraConfig(**BD) if bd else None
    )
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    _fill_random(model, seed)
    if block_diagonal_plain:  # zero the off-block entries of column B and row A: exactly block-diagonal
        with torch.no_grad():
            for name, p in model.named_parameters():
                row = any(t in name for t in ROW_TARGETS)
                if ("lora_B" in name and not row) or ("lora_A" in name and row):
                    p.copy_(torch.block_diag(*[c.chunk(NBLOCKS, dim=1)[j] for j, c in enumerate(p.chunk(NBLOCKS))]))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Base model (saved with its config.json) and the PEFT adapters under test."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=128,
        num_hidden_layers=2, vocab_size=128,
    )
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(root / "base")
    return dict(
        root=root,
        base=base,
        hf=json.loads((root / "base" / "config.json").read_text()),
        base_dir=root / "base",
        bd=_make_peft(base, root / "peft_bd", seed=1),
        plain=_make_peft(base, root / "peft_plain", seed=2, bd=False),
        plain_bd=_make_peft(base, root / "peft_plain_bd", seed=3, bd=False, block_diagonal_plain=True),
        plain_r6=_make_peft(base, root / "peft_plain_r6", seed=4, r=6, bd=False),
    )


def _peft_tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "adapter_model.safetensors"))


def _peft_config(d: Path) -> dict:
    return json.loads((d / "adapter_config.json").read_text())


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _rank_files(d: Path, tp: int) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(d / rank_file_name(i))) for i in range(tp)]


def _expand(packed: torch.Tensor, nblocks: int) -> torch.Tensor:
    """Independent reference: the packed layout's block j maps input chunk j to output chunk j."""
    return torch.block_diag(*packed.chunk(nblocks, dim=0)) if nblocks > 1 else packed


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_peft_bd_to_native_to_peft_is_bit_exact(assets, tmp_path, tp):
    native = import_peft_directory(assets["bd"], tmp_path / "native", assets["base_dir"], tp, "block_diagonal")
    manifest = read_manifest(native)
    assert (manifest["tp"], manifest["mode"], manifest["nblocks"], manifest["rank"]) == (tp, "block_diagonal", 4, 8)
    assert manifest["scaling"] == 2.0 and manifest["num_layers"] == 2 and manifest["dtype"] == "float32"
    export_peft(load_native(native), tmp_path / "peft")
    _assert_same_tensors(_peft_tensors(tmp_path / "peft"), _peft_tensors(assets["bd"]))
    ours, theirs = _peft_config(tmp_path / "peft"), _peft_config(assets["bd"])
    assert {k: ours[k] for k in CONFIG_FIELDS} == {k: theirs[k] for k in CONFIG_FIELDS}
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    assert ours["peft_type"] == "LORA" and ours["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize("tp", [2, 4])
def test_native_rank_files_hold_the_documented_slices(assets, tmp_path, tp):
    """Independent of the plan: column BD splits A and packed B by rows; row BD splits packed A by rows, B by cols."""
    native = import_peft_directory(assets["bd"], tmp_path / "native", assets["base_dir"], tp, "block_diagonal")
    full, ranks = _peft_tensors(assets["bd"]), _rank_files(native, tp)
    for proj, module in (("q_proj", "self_attn"), ("v_proj", "self_attn"), ("o_proj", "self_attn"),
                         ("up_proj", "mlp"), ("down_proj", "mlp")):
        a = full[f"base_model.model.model.layers.1.{module}.{proj}.lora_A.weight"]
        b = full[f"base_model.model.model.layers.1.{module}.{proj}.lora_B.weight"]
        b_dim = 1 if proj in ROW_TARGETS else 0
        for i in range(tp):
            assert torch.equal(ranks[i][f"layers.1.{proj}.lora_A"], a.chunk(tp, dim=0)[i])
            assert torch.equal(ranks[i][f"layers.1.{proj}.lora_B"], b.chunk(tp, dim=b_dim)[i])


def test_native_to_peft_to_native_is_bit_exact(assets, tmp_path):
    native = import_peft_directory(assets["bd"], tmp_path / "native", assets["base_dir"], 2, "block_diagonal")
    export_peft(load_native(native), tmp_path / "peft")
    again = import_peft_directory(tmp_path / "peft", tmp_path / "again", assets["base_dir"], 2, "block_diagonal")
    for a, b in zip(_rank_files(native, 2), _rank_files(again, 2)):
        _assert_same_tensors(a, b)
    assert read_manifest(native) == read_manifest(again)


def test_reshard_tp4_tp2_tp1_tp4_is_bit_exact(assets, tmp_path):
    tp4 = import_peft_directory(assets["bd"], tmp_path / "tp4", assets["base_dir"], 4, "block_diagonal")
    reshard_directory(tp4, tmp_path / "tp2", 2)
    reshard_directory(tmp_path / "tp2", tmp_path / "tp1", 1)
    back = reshard_directory(tmp_path / "tp1", tmp_path / "back", 4)
    assert read_manifest(tmp_path / "tp1")["nblocks"] == 4  # kept, not reset to the TP degree
    for a, b in zip(_rank_files(tp4, 4), _rank_files(back, 4)):
        _assert_same_tensors(a, b)
    assert read_manifest(tp4) == read_manifest(back)


@pytest.mark.parametrize("mode", ["slora", "replicated"])
def test_bd_to_dense_mode_and_back_is_bit_exact(assets, tmp_path, mode):
    ckpt = load_native(import_peft_directory(assets["bd"], tmp_path / "n", assets["base_dir"], 2, "block_diagonal"))
    dense = reshard(ckpt, 4, mode)
    assert dense.factors[(0, "q_proj")][1].shape == (64, 8)  # B of q_proj now dense
    back = reshard(dense, 2, "block_diagonal", nblocks=4)
    for key, (a, b) in ckpt.factors.items():
        assert torch.equal(back.factors[key][0], a) and torch.equal(back.factors[key][1], b), key


# ------------------------------------------------------------------------------------------ against PEFT's math


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_matches_peft_merged_weights(assets, tmp_path, rslora):
    src = assets["bd"]
    if rslora:  # alpha and rsLoRA honoured: scaling 12 / sqrt(8)
        src = _edit_config(_copy(src, tmp_path / "rs"), use_rslora=True, lora_alpha=12)
    ckpt = load_native(import_peft_directory(src, tmp_path / "n", assets["base_dir"], 2, "block_diagonal"))
    assert ckpt.settings.scaling == pytest.approx(12 / 8**0.5 if rslora else 2.0)
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(assets["base"]), src).merge_and_unload()
    for layer in range(2):
        for proj in ALL_TARGETS:
            module = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            get = lambda m: getattr(getattr(m.model.layers[layer], module), proj).weight  # noqa: E731
            peft_delta = get(merged) - get(assets["base"])
            plan = lora_plan(assets["hf"], proj, ckpt.settings, 1)
            ours = ckpt.settings.scaling * plan.dense_delta(*ckpt.factors[(layer, proj)])
            assert peft_delta.abs().max() > 0.1
            torch.testing.assert_close(ours, peft_delta, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["block_diagonal", "slora"])
def test_exported_adapter_gives_peft_logits(assets, tmp_path, mode):
    """Our export of the BD adapter (as BD, or as plain LoRA after S-LoRA import) loads in PEFT, same logits."""
    import_peft_directory(assets["bd"], tmp_path / "n", assets["base_dir"], 2, mode)
    export_peft(load_native(tmp_path / "n"), tmp_path / "peft")
    assert ("use_bdlora" in _peft_config(tmp_path / "peft")) and (
        bool(_peft_config(tmp_path / "peft")["use_bdlora"]) == (mode == "block_diagonal")
    )
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(assets["base"]), assets["bd"]).eval(), ids)
    ours = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(assets["base"]), tmp_path / "peft").eval(), ids)
    assert (reference - _logits(assets["base"], ids)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ plain LoRA


@pytest.mark.parametrize("mode", ["replicated", "slora"])
def test_plain_lora_imports_exactly_as_dense_modes(assets, tmp_path, mode):
    native = import_peft_directory(assets["plain"], tmp_path / "n", assets["base_dir"], 2, mode)
    assert read_manifest(native)["nblocks"] is None
    export_peft(load_native(native), tmp_path / "peft")
    _assert_same_tensors(_peft_tensors(tmp_path / "peft"), _peft_tensors(assets["plain"]))
    assert _peft_config(tmp_path / "peft")["use_bdlora"] is None


def test_plain_lora_is_refused_for_bd_with_off_block_magnitude(assets):
    with pytest.raises(AdapterCheckpointError, match="largest off-block magnitude") as e:
        import_peft(assets["plain"], assets["hf"], 2, "block_diagonal")
    assert "q_proj.lora_B.weight" in str(e.value)


@pytest.mark.parametrize("tp, nblocks", [(4, None), (2, 4), (2, None)])
def test_block_diagonal_plain_lora_is_accepted_into_bd(assets, tmp_path, tp, nblocks):
    ckpt = import_peft(assets["plain_bd"], assets["hf"], tp, "block_diagonal", nblocks)
    assert ckpt.settings.nblocks == (nblocks or tp)
    src = _peft_tensors(assets["plain_bd"])
    for (layer, proj), (a, b) in ckpt.factors.items():
        module = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        key = f"base_model.model.model.layers.{layer}.{module}.{proj}"
        plan = lora_plan(assets["hf"], proj, ckpt.settings, tp)
        assert plan.block_diagonal_factor == ("A" if proj in ROW_TARGETS else "B")
        assert torch.equal(_expand(a, plan.a.packed_blocks), src[f"{key}.lora_A.weight"])
        assert torch.equal(_expand(b, plan.b.packed_blocks), src[f"{key}.lora_B.weight"])
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    export_peft(ckpt, tmp_path / "peft")
    reference = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(assets["base"]), assets["plain_bd"]), ids)
    ours = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(assets["base"]), tmp_path / "peft"), ids)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------- the one reader


def test_read_adapter_gives_every_rank_its_slices(assets, tmp_path):
    native = import_peft_directory(assets["bd"], tmp_path / "n", assets["base_dir"], 4, "block_diagonal")
    ckpt = load_native(native)
    adapter = read_adapter(native, assets["hf"], 4)
    for i in range(4):
        _assert_same_tensors(adapter.rank_state(i), ckpt.rank_state(i))


def test_read_adapter_refuses_other_base_shape(assets, tmp_path):
    native = import_peft_directory(assets["bd"], tmp_path / "n", assets["base_dir"], 2, "block_diagonal")
    other = dict(assets["hf"], intermediate_size=256)
    with pytest.raises(AdapterCheckpointError, match="another base model") as e:
        read_adapter(native, other, 2)
    assert "'intermediate_size': 128" in str(e.value) and "'intermediate_size': 256" in str(e.value)
    assert "adapter_manifest.json" in str(e.value)


def test_read_adapter_at_another_tp_reshards_in_memory(assets, tmp_path):
    native = import_peft_directory(assets["bd"], tmp_path / "n", assets["base_dir"], 2, "block_diagonal")
    want = reshard(load_native(native), 4)
    adapter = read_adapter(native, assets["hf"], 4)
    assert adapter.settings == want.settings and adapter.tp == 4
    for i in range(4):
        _assert_same_tensors(adapter.rank_state(i), want.rank_state(i))


def test_adapter_with_other_settings_is_refused_by_the_settings_check(assets, tmp_path):
    native = import_peft_directory(assets["bd"], tmp_path / "n", assets["base_dir"], 2, "block_diagonal")
    saved = read_adapter(native, assets["hf"], 2).settings
    with pytest.raises(AdapterCheckpointError, match="rank"):
        check_same_settings(saved, LoRASettings(rank=16, alpha=16, nblocks=4), 2, native)


def test_save_native_rank_states_matches_save_native(assets, tmp_path):
    ckpt = import_peft(assets["plain"], assets["hf"], 2, "replicated")
    save_native(ckpt, tmp_path / "a")
    save_native_rank_states(tmp_path / "b", ckpt.settings, assets["hf"], 2, [ckpt.rank_state(i) for i in range(2)])
    for a, b in zip(_rank_files(tmp_path / "a", 2), _rank_files(tmp_path / "b", 2)):
        _assert_same_tensors(a, b)


def test_save_native_rank_states_refuses_diverged_replicas(assets, tmp_path):
    ckpt = import_peft(assets["plain"], assets["hf"], 2, "replicated")
    states = [ckpt.rank_state(i) for i in range(2)]
    states[1]["layers.0.q_proj.lora_A"] = states[1]["layers.0.q_proj.lora_A"] + 1e-3  # column A is replicated
    with pytest.raises(AdapterCheckpointError, match="layers.0.q_proj.lora_A.*differs"):
        save_native_rank_states(tmp_path / "x", ckpt.settings, assets["hf"], 2, states)
    assert not (tmp_path / "x").exists()


def test_save_native_rank_states_names_wrong_shape(assets, tmp_path):
    ckpt = import_peft(assets["bd"], assets["hf"], 2, "block_diagonal")
    states = [ckpt.rank_state(i) for i in range(2)]
    states[1]["layers.1.o_proj.lora_B"] = torch.zeros(64, 8)
    with pytest.raises(AdapterCheckpointError, match=r"rank 1 state: tensor 'layers.1.o_proj.lora_B' has shape "
                                                     r"\[64, 8\], expected \[64, 4\]"):
        save_native_rank_states(tmp_path / "x", ckpt.settings, assets["hf"], 2, states)


# ------------------------------------------------------------------------------------------ CLIs on bad input


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **fields) -> Path:
    cfg = _peft_config(d)
    cfg.update(fields)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def _edit_tensor(d: Path, key: str, value: torch.Tensor) -> Path:
    tensors = _peft_tensors(d)
    tensors[key] = value
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


Q0_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

# name -> (prepare(assets, tmp) -> peft dir, extra CLI args, substrings the error must contain)
IMPORT_CASES = {
    "missing_config": (
        lambda s, t: (_copy(s["bd"], t / "p") / "adapter_config.json").unlink() or t / "p", [],
        ["adapter_config.json", "does not exist"]),
    "missing_weights": (
        lambda s, t: (_copy(s["bd"], t / "p") / "adapter_model.safetensors").unlink() or t / "p", [],
        ["adapter_model.safetensors", "does not exist"]),
    "wrong_shape": (
        lambda s, t: _edit_tensor(_copy(s["bd"], t / "p"), Q0_B, torch.zeros(64, 8)), [],
        [Q0_B, "[64, 8]", "expected [64, 2]"]),
    "missing_tensor": (
        lambda s, t: _drop(_copy(s["bd"], t / "p"), Q0_B), [],
        [Q0_B, "missing"]),
    "truncated_weights": (
        lambda s, t: _truncate(_copy(s["bd"], t / "p") / "adapter_model.safetensors") or t / "p", [],
        ["adapter_model.safetensors", "truncated"]),
    "rank_pattern": (
        lambda s, t: _edit_config(_copy(s["bd"], t / "p"), rank_pattern={"q_proj": 16}), [], ["rank_pattern"]),
    "alpha_pattern": (
        lambda s, t: _edit_config(_copy(s["bd"], t / "p"), alpha_pattern={"v_proj": 4}), [], ["alpha_pattern"]),
    "fan_in_fan_out": (
        lambda s, t: _edit_config(_copy(s["bd"], t / "p"), fan_in_fan_out=True), [], ["fan_in_fan_out"]),
    "use_dora": (lambda s, t: _edit_config(_copy(s["bd"], t / "p"), use_dora=True), [], ["use_dora"]),
    "bias": (lambda s, t: _edit_config(_copy(s["bd"], t / "p"), bias="all"), [], ["bias='all'"]),
    "modules_to_save": (
        lambda s, t: _edit_config(_copy(s["bd"], t / "p"), modules_to_save=["lm_head"]), [], ["modules_to_save"]),
    "lora_bias": (lambda s, t: _edit_config(_copy(s["bd"], t / "p"), lora_bias=True), [], ["lora_bias"]),
    "use_qalora": (lambda s, t: _edit_config(_copy(s["bd"], t / "p"), use_qalora=True), [], ["use_qalora"]),
    "layers_subset": (
        lambda s, t: _edit_config(_copy(s["bd"], t / "p"), layers_to_transform=[0]), [], ["layers_to_transform"]),
    "unknown_target": (
        lambda s, t: _edit_config(_copy(s["bd"], t / "p"), target_modules=["q_proj", "c_attn"]), [],
        ["'c_attn'", "not a projection"]),
    "nblocks_not_divisible": (lambda s, t: s["bd"], ["--tp", "8"], ["nblocks=4", "tp=8"]),
    "slora_rank": (lambda s, t: s["plain_r6"], ["--mode", "slora"], ["rank=6", "tp=4"]),
    "plain_into_bd": (lambda s, t: s["plain"], ["--mode", "block_diagonal"], ["largest off-block magnitude",
                                                                               "lora_B.weight"]),
    "missing_base_config": (lambda s, t: s["bd"], ["--base-config", "{tmp}/nowhere/config.json"], ["config.json"]),
}


def _drop(d: Path, key: str) -> Path:
    tensors = _peft_tensors(d)
    del tensors[key]
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def _run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *map(str, args)], capture_output=True, text=True, cwd=REPO
    )


def _assert_clean_failure(proc: subprocess.CompletedProcess, out: Path, needles: list[str]) -> None:
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def _run_tool_in_process(tool: str, *args: str) -> subprocess.CompletedProcess:
    """The tool's main() in this process, with what its process would exit with and print on stderr: sys.exit("msg")
    prints msg and exits 1. Any other exception propagates, i.e. would have been a traceback. (The CLI's own exit
    path is exercised by the subprocess runs below; this spares a torch import per case.)"""
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            _tool_module(tool).main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=err)
    return subprocess.CompletedProcess([tool, *map(str, args)], code, "", err.getvalue())


@pytest.fixture(scope="module")
def import_failures(assets, tmp_path_factory):
    """Every IMPORT_CASES run through the import tool's main()."""
    def run(case):
        tmp = tmp_path_factory.mktemp(case)
        prepare, extra, _ = IMPORT_CASES[case]
        args = {"--peft-dir": prepare(assets, tmp), "--base-config": assets["base_dir"], "--out-dir": tmp / "out",
                "--tp": "4", "--mode": "block_diagonal"}
        args.update(dict(zip(extra[::2], [e.format(tmp=tmp) for e in extra[1::2]])))
        return _run_tool_in_process("peft_import.py", *[x for kv in args.items() for x in kv]), tmp / "out"

    return {case: run(case) for case in IMPORT_CASES}


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_peft_import_cli_rejects_bad_input(import_failures, case):
    proc, out = import_failures[case]
    _assert_clean_failure(proc, out, IMPORT_CASES[case][2])


def test_peft_import_cli_succeeds_and_refuses_to_overwrite(assets, tmp_path):
    args = ["--peft-dir", assets["bd"], "--base-config", assets["base_dir"] / "config.json",
            "--out-dir", tmp_path / "out", "--tp", "2", "--mode", "block_diagonal"]
    ok = _run_tool("peft_import.py", *args)
    assert ok.returncode == 0, ok.stderr
    before = (tmp_path / "out" / "adapter_manifest.json").read_text()
    again = _run_tool("peft_import.py", *args)
    assert again.returncode != 0 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "out" / "adapter_manifest.json").read_text() == before


def _tool_module(tool: str):
    """A CLI from tools/ imported by path, so its main() runs in-process."""
    return load_tool(tool.removesuffix(".py"))


def test_peft_import_cli_defaults_the_base_config_to_the_adapters_local_base_model(assets, tmp_path, monkeypatch):
    """No --base-config: base_model_name_or_path (relative to the working directory, as transformers reads it) is
    used."""
    adapter = _edit_config(_copy(assets["bd"], tmp_path / "p"), base_model_name_or_path=assets["base_dir"].name)
    monkeypatch.chdir(assets["base_dir"].parent)
    args = ["--peft-dir", str(adapter), "--out-dir", str(tmp_path / "out"), "--tp", "2", "--mode", "block_diagonal"]
    assert _tool_module("peft_import.py").main(args) == 0
    explicit = import_peft_directory(
        adapter, tmp_path / "explicit", assets["base_dir"] / "config.json", 2, "block_diagonal"
    )
    assert read_manifest(tmp_path / "out") == read_manifest(explicit)
    for got, want in zip(_rank_files(tmp_path / "out", 2), _rank_files(explicit, 2)):
        _assert_same_tensors(got, want)


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B-Instruct", None])
def test_peft_import_cli_without_base_config_names_the_unusable_base_model(assets, tmp_path, name):
    adapter = _edit_config(_copy(assets["bd"], tmp_path / "p"), base_model_name_or_path=name)
    args = ["--peft-dir", str(adapter), "--out-dir", str(tmp_path / "out"), "--tp", "2", "--mode", "block_diagonal"]
    with pytest.raises(SystemExit) as exit_info:
        _tool_module("peft_import.py").main(args)
    err = str(exit_info.value.code)
    assert err.startswith("error: ") and f"base_model_name_or_path={name!r}" in err and "--base-config" in err, err
    assert not (tmp_path / "out").exists()


def test_reshard_and_export_clis_reject_bad_native_checkpoints(assets, tmp_path):
    native = import_peft_directory(assets["bd"], tmp_path / "n", assets["base_dir"], 2, "block_diagonal")
    proc = _run_tool("reshard_adapter.py", "--adapter-dir", native, "--out-dir", tmp_path / "o1", "--tp", "8")
    _assert_clean_failure(proc, tmp_path / "o1", ["nblocks=4", "tp=8"])

    broken = _copy(native, tmp_path / "broken")
    _truncate(broken / rank_file_name(1))
    proc = _run_tool("peft_export.py", "--adapter-dir", broken, "--out-dir", tmp_path / "o2")
    _assert_clean_failure(proc, tmp_path / "o2", [rank_file_name(1), "truncated"])

    no_manifest = _copy(native, tmp_path / "no_manifest")
    (no_manifest / "adapter_manifest.json").unlink()
    proc = _run_tool_in_process(
        "reshard_adapter.py", "--adapter-dir", no_manifest, "--out-dir", tmp_path / "o3", "--tp", "1"
    )
    _assert_clean_failure(proc, tmp_path / "o3", ["adapter_manifest.json"])

    swapped = _copy(native, tmp_path / "swapped")
    (swapped / rank_file_name(0)).rename(swapped / "tmp")
    (swapped / rank_file_name(1)).rename(swapped / rank_file_name(0))
    (swapped / "tmp").rename(swapped / rank_file_name(1))
    proc = _run_tool_in_process(
        "reshard_adapter.py", "--adapter-dir", swapped, "--out-dir", tmp_path / "o4", "--tp", "1"
    )
    _assert_clean_failure(proc, tmp_path / "o4", [rank_file_name(0), "tp_rank=1"])


@pytest.mark.parametrize("tool", ["peft_import.py", "peft_export.py", "reshard_adapter.py"])
def test_clis_document_every_flag(tool):
    actions = _tool_module(tool).build_parser()._actions
    assert {"--out-dir", "--overwrite"} <= {o for a in actions for o in a.option_strings}
    assert all(a.help for a in actions), [a.option_strings for a in actions if not a.help]
