"""HF Llama <-> megatron base checkpoint: bit-exact round trips, the fused layouts by hand, rejected inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft_reference import ATTENTION_GAIN, LLAMA3_ROPE_LLAMA, LLAMA3_ROPE_SEQ, make_random_llama
from safetensors.torch import load_file, save_file
from tool_module import load_tool

from megatron_bdlora.checkpoint.base_model import ensure_base_model
from megatron_bdlora.checkpoint.hf import (
    CheckpointError,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    load_megatron_rank_state,
    read_megatron_meta,
)

ROOT = Path(__file__).resolve().parents[2]
# hidden 64, 8 heads of 8, 4 KV heads, ffn 96, 2 layers, vocab 250 (padded to 252 at TP 4)
TINY = dict(
    hidden_size=64,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=96,
    num_hidden_layers=2,
    vocab_size=250,
    max_position_embeddings=64,
)


def _tool(name: str):
    """A CLI module from tools/ (not a package), imported by path so its main() runs in-process."""
    return load_tool(name)


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors checkpoint, single-file or sharded."""
    index = hf_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out = {}
    for name in files:
        out.update(load_file(hf_dir / name))
    return out


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_hf(request, tmp_path_factory) -> Path:
    """A random LlamaForCausalLM (every parameter, norms included, drawn from N(0, 1)) saved as HF safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=request.param))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    out = tmp_path_factory.mktemp("tiny") / "hf"
    model.save_pretrained(out)
    (out / "tokenizer_config.json").write_text('{"marker": "copied verbatim"}\n')
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip_is_bit_exact(tiny_hf, tp, tmp_path):
    meg = convert_hf_to_megatron(tiny_hf, tmp_path / "meg", tp, progress=False)
    tied = json.loads((tiny_hf / "config.json").read_text())["tie_word_embeddings"]
    meta = read_megatron_meta(meg)
    assert meta == {
        "format": "megatron-bdlora-base",
        "version": 1,
        "tp": tp,
        "vocab_size": 250,
        "padded_vocab_size": -(-250 // tp) * tp,
        "tie_word_embeddings": tied,
        "dtype": "float32",
    }
    assert sorted(p.name for p in meg.glob("tp_rank_*")) == [f"tp_rank_{i:02d}" for i in range(tp)]
    back = convert_megatron_to_hf(meg, tmp_path / "hf", progress=False)
    _assert_same_tensors(_hf_tensors(back), _hf_tensors(tiny_hf))
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / name).read_bytes() == (tiny_hf / name).read_bytes(), name


def test_vocab_padding_rows_are_zero_and_dropped(tiny_hf, tmp_path):
    meg = convert_hf_to_megatron(tiny_hf, tmp_path / "meg", 4, progress=False)
    embed = _hf_tensors(tiny_hf)["model.embed_tokens.weight"]
    shards = [load_megatron_rank_state(meg, rank, tp=4)["embedding.word_embeddings.weight"] for rank in range(4)]
    assert [tuple(s.shape) for s in shards] == [(63, 64)] * 4  # 252 / 4
    assert torch.equal(shards[3][-2:], torch.zeros(2, 64))
    assert torch.equal(torch.cat(shards)[:250], embed)


def test_converted_checkpoint_loads_in_transformers(tiny_hf, tmp_path):
    from transformers import LlamaForCausalLM

    meg = convert_hf_to_megatron(tiny_hf, tmp_path / "meg", 2, progress=False)
    back = convert_megatron_to_hf(meg, tmp_path / "hf", progress=False)
    ids = torch.tensor([[1, 5, 9, 249]])
    with torch.no_grad():
        want = LlamaForCausalLM.from_pretrained(tiny_hf).eval()(ids).logits
        got = LlamaForCausalLM.from_pretrained(back).eval()(ids).logits
    assert torch.equal(got, want)


def _rope_fields(config: dict) -> dict:
    return {k: v for k, v in config.items() if k.startswith("rope")}


def test_round_trip_keeps_llama3_rope_scaling(tmp_path):
    """HF -> megatron (TP 2) -> HF of a Llama-3.1-scaled config: the rope block reaches the megatron checkpoint
    (the model builder reads it there) and comes back; transformers computes identical logits from the result,
    where the same weights without the block would differ."""
    from transformers import LlamaForCausalLM

    hf_model, ids, _ = make_random_llama(tmp_path, (2,), LLAMA3_ROPE_LLAMA, LLAMA3_ROPE_SEQ, ATTENTION_GAIN)
    back = convert_megatron_to_hf(tmp_path / "meg_tp2", tmp_path / "back", progress=False)
    original = _rope_fields(json.loads((tmp_path / "hf" / "config.json").read_text()))
    assert any(block.get("rope_type") == "llama3" for block in original.values() if isinstance(block, dict)), original
    for converted in (tmp_path / "meg_tp2", back):
        assert _rope_fields(json.loads((converted / "config.json").read_text())) == original, converted
    reloaded = LlamaForCausalLM.from_pretrained(back).eval()
    assert reloaded.config.rope_parameters == hf_model.config.rope_parameters
    with torch.no_grad():
        want, got = hf_model(ids).logits, reloaded(ids).logits
    assert torch.equal(got, want)
    _edit_config(
        back, rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": LLAMA3_ROPE_LLAMA["rope_theta"]}
    )
    with torch.no_grad():
        unscaled = LlamaForCausalLM.from_pretrained(back).eval()(ids).logits
    assert (unscaled - want).abs().max() > 0.1, "dropping the rope block must change the logits for the check to bite"


def test_large_output_is_sharded_with_an_index_and_converts_back(tiny_hf, tmp_path):
    meg = convert_hf_to_megatron(tiny_hf, tmp_path / "meg", 2, progress=False)
    back = convert_megatron_to_hf(meg, tmp_path / "hf", max_shard_bytes=100_000, progress=False)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (back / "model.safetensors").exists()
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    _assert_same_tensors(_hf_tensors(back), _hf_tensors(tiny_hf))
    # the sharded HF checkpoint is read back through its index
    again = convert_hf_to_megatron(back, tmp_path / "meg2", 2, progress=False)
    for rank in range(2):
        _assert_same_tensors(load_megatron_rank_state(again, rank), load_megatron_rank_state(meg, rank))


def test_rank_shards_match_hand_built_megatron_layout(tiny_hf, tmp_path):
    """TP 2: rank i holds KV groups 2i, 2i+1, each as [2 q heads, k head, v head]; fc1 = [gate chunk i; up chunk i]."""
    tp, hd, q_per_group = 2, 8, 2
    meg = convert_hf_to_megatron(tiny_hf, tmp_path / "meg", tp, progress=False)
    hf = _hf_tensors(tiny_hf)
    tied = "lm_head.weight" not in hf
    for rank in range(tp):
        state = load_megatron_rank_state(meg, rank, tp=tp)
        expected_keys = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"}
        expected_keys |= set() if tied else {"output_layer.weight"}
        for layer in range(2):
            d, a = f"decoder.layers.{layer}.", f"model.layers.{layer}."
            expected_keys |= {
                d + "input_layernorm.weight",
                d + "self_attention.linear_qkv.weight",
                d + "self_attention.linear_proj.weight",
                d + "pre_mlp_layernorm.weight",
                d + "mlp.linear_fc1.weight",
                d + "mlp.linear_fc2.weight",
            }
            q, k, v = (hf[f"{a}self_attn.{n}_proj.weight"] for n in "qkv")
            rows = []
            for group in (2 * rank, 2 * rank + 1):
                for head in range(group * q_per_group, (group + 1) * q_per_group):
                    rows.append(q[head * hd : (head + 1) * hd])
                rows.append(k[group * hd : (group + 1) * hd])
                rows.append(v[group * hd : (group + 1) * hd])
            assert torch.equal(state[d + "self_attention.linear_qkv.weight"], torch.cat(rows)), (rank, layer)
            gate, up = hf[a + "mlp.gate_proj.weight"], hf[a + "mlp.up_proj.weight"]
            fc1 = torch.cat([gate[rank * 48 : (rank + 1) * 48], up[rank * 48 : (rank + 1) * 48]])
            assert torch.equal(state[d + "mlp.linear_fc1.weight"], fc1)
            assert torch.equal(
                state[d + "self_attention.linear_proj.weight"],
                hf[a + "self_attn.o_proj.weight"][:, rank * 32 : (rank + 1) * 32],
            )
            assert torch.equal(
                state[d + "mlp.linear_fc2.weight"], hf[a + "mlp.down_proj.weight"][:, rank * 48 : (rank + 1) * 48]
            )
            assert torch.equal(state[d + "pre_mlp_layernorm.weight"], hf[a + "post_attention_layernorm.weight"])
        assert set(state) == expected_keys
        assert torch.equal(
            state["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"][rank * 125 : (rank + 1) * 125]
        )


def test_load_rank_state_rejects_a_different_tp(tiny_hf, tmp_path):
    meg = convert_hf_to_megatron(tiny_hf, tmp_path / "meg", 2, progress=False)
    with pytest.raises(CheckpointError, match=r"sharded for tp=2, but the model runs with tp=4"):
        load_megatron_rank_state(meg, 0, tp=4)


# --------------------------------------------------------------------------------------------------------------
# Rejected inputs: one `error:` line naming the culprit, exit code 2, nothing left in the output's parent


def _edit_tensors(hf_dir: Path, edit) -> None:
    tensors = load_file(hf_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


def _edit_config(hf_dir: Path, **changes) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


BAD_INPUTS = {
    "missing": (
        2,
        lambda d: _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        ["missing tensors", "model.layers.1.mlp.up_proj.weight"],
    ),
    "extra": (
        2,
        lambda d: _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})),
        ["unexpected tensors", "model.layers.0.self_attn.q_proj.bias"],
    ),
    "shape": (
        2,
        lambda d: _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(24, 64)})),
        ["model.layers.0.self_attn.k_proj.weight", "(24, 64)", "expected (32, 64)"],
    ),
    "heads": (3, lambda d: None, ["tp=3", "num_attention_heads=8"]),
    "kv_heads": (2, lambda d: _edit_config(d, num_key_value_heads=1), ["tp=2", "num_key_value_heads=1"]),
    "gpt2": (
        2,
        lambda d: _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
        ["model_type='gpt2'", "GPT2LMHeadModel"],
    ),
    "bias": (2, lambda d: _edit_config(d, attention_bias=True), ["attention_bias=true"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_hf_input_is_rejected_by_name(tiny_hf, tmp_path, capsys, case):
    tp, corrupt, needles = BAD_INPUTS[case]
    bad = tmp_path / "bad"
    shutil.copytree(tiny_hf, bad)
    corrupt(bad)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    rc = _tool("convert_hf_to_megatron").main(
        ["--hf-dir", str(bad), "--out-dir", str(out_parent / "meg"), "--tp", str(tp), "--no-progress"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert _leftovers(out_parent, set()) == []


def test_bad_megatron_shard_is_rejected_by_name(tiny_hf, tmp_path, capsys):
    meg = convert_hf_to_megatron(tiny_hf, tmp_path / "meg", 2, progress=False)
    rank_file = meg / "tp_rank_01" / "model.safetensors"
    state = load_file(rank_file)
    state["decoder.layers.1.mlp.linear_fc2.weight"] = torch.zeros(64, 47)
    save_file(state, rank_file)
    rc = _tool("convert_megatron_to_hf").main(
        ["--megatron-dir", str(meg), "--out-dir", str(tmp_path / "hf"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "decoder.layers.1.mlp.linear_fc2.weight" in err and "expected (64, 48)" in err
    shutil.rmtree(meg / "tp_rank_01")
    rc = _tool("convert_megatron_to_hf").main(
        ["--megatron-dir", str(meg), "--out-dir", str(tmp_path / "hf"), "--no-progress"]
    )
    assert rc == 2 and "tp rank 1" in capsys.readouterr().err
    assert _leftovers(tmp_path, {"meg"}) == []


def test_cli_process_exits_2_without_traceback(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    out = tmp_path / "meg"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_hf_to_megatron.py"),
            "--hf-dir",
            str(hf),
            "--out-dir",
            str(out),
            "--tp",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "error: tp=3 does not divide num_attention_heads=8" in proc.stderr
    assert not out.exists()


def test_existing_output_needs_overwrite(tiny_hf, tmp_path):
    meg = convert_hf_to_megatron(tiny_hf, tmp_path / "meg", 1, progress=False)
    with pytest.raises(FileExistsError):
        convert_hf_to_megatron(tiny_hf, meg, 2, progress=False)
    convert_hf_to_megatron(tiny_hf, meg, 2, overwrite=True, progress=False)
    assert read_megatron_meta(meg)["tp"] == 2 and _leftovers(tmp_path, {"meg"}) == []


# --------------------------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M-Instruct (9 heads, 3 KV heads, tied embeddings)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return ensure_base_model()


@pytest.mark.parametrize("tp", [1, 3])
def test_smollm2_round_trip_is_bit_exact(smollm2, tp, tmp_path):
    meg = convert_hf_to_megatron(smollm2, tmp_path / "meg", tp, progress=False)
    back = convert_megatron_to_hf(meg, tmp_path / "hf", progress=False)
    shutil.rmtree(meg)
    _assert_same_tensors(_hf_tensors(back), _hf_tensors(smollm2))
    for path in smollm2.iterdir():
        if path.name != "model.safetensors":
            assert (back / path.name).read_bytes() == path.read_bytes(), path.name
    if tp == 3:  # and it is the same model to transformers
        from transformers import LlamaForCausalLM

        ids = torch.tensor([[1, 4093, 198, 19556, 905, 17, 2]])
        with torch.no_grad():
            want = LlamaForCausalLM.from_pretrained(smollm2).eval()(ids).logits
            got = LlamaForCausalLM.from_pretrained(back).eval()(ids).logits
        assert torch.equal(got, want)
    shutil.rmtree(back)
