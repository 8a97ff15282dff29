"""Serving the embedded SmolLM2-135M-Instruct at TP=3: a mixed BD stream against merged full recompute, and an
adapter written by PEFT itself (use_bdlora, nblocks 3) through the HTTP server against transformers + PEFT."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from megatron_bdlora.config import LoRASettings
from megatron_bdlora.local_ranks import run_distributed
from peft_reference import peft_model, random_factors
from serving_reference import write_adapters
from test_serve_live import LiveServer
from test_serving_engine import _check, stream_worker


@pytest.fixture(scope="module")
def smollm2():
    from megatron_bdlora.base_models import ensure_megatron_base, resolve_hf_base

    hf_dir = resolve_hf_base("smollm2-135m-instruct")
    return hf_dir, ensure_megatron_base(hf_dir, 3)


def test_smollm2_tp3_mixed_bd_stream_matches_merged_full_recompute(smollm2, tmp_path):
    _, meg = smollm2
    # ranks 12 / 12, nblocks 3 / 6; updates of a trained adapter's size (not many times the base weights,
    # which would blow float32 rounding through 30 layers past the 1e-4 budget)
    adapters = write_adapters(tmp_path, meg, 3, ["a0", "a2"], scale=0.05)
    rng = random.Random(3)
    stream = [(i, [rng.randrange(100, 40000) for _ in range(rng.randrange(4, 30))], a, 4)
              for i, a in enumerate(["a0", None, "a2", "a0"])]
    config = dict(max_loras=3, max_lora_rank=24, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64,
                  kv_cache_gb=0.05, block_size=16)
    result = run_distributed(stream_worker, 3, meg, adapters, "block_diagonal", stream, config)[0]
    _check(result, stream, "smollm2 tp=3")


def test_peft_made_bd_adapter_served_at_tp3_over_http_returns_peft_greedy_text(smollm2, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    hf_dir, _ = smollm2
    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_config = hf_model.config.to_dict()
    settings = LoRASettings(rank=6, alpha=12, nblocks=3)
    ref = peft_model(copy.deepcopy(hf_model), settings, random_factors(hf_config, settings, seed=5, scale=0.15))
    ref.save_pretrained(tmp_path / "peft_bd")  # PEFT's own files: adapter_config.json with use_bdlora, packed factors
    messages = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Write one sentence about the sea.")]
    gen = GenerationConfig(do_sample=False, max_new_tokens=16, pad_token_id=tok.pad_token_id)
    want, base_text = [], []
    with torch.no_grad():
        for m in messages:
            ids = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
            out = ref.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), generation_config=gen)
            want.append(tok.decode(out[0, len(ids):], skip_special_tokens=True))
            base = hf_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), generation_config=gen)
            base_text.append(tok.decode(base[0, len(ids):], skip_special_tokens=True))
    assert base_text != want, "adapter too weak to test anything: PEFT's text equals the base model's"
    # no --megatron-dir: the embedded SmolLM2, converted for TP=3 and cached
    server = LiveServer(3, ["--mode", "block_diagonal", "--adapter", f"bd={tmp_path / 'peft_bd'}", "--max-loras", "2",
                            "--max-model-len", "256", "--kv-cache-gb", "0.1"])
    try:
        for m, text in zip(messages, want):
            got = server.client.chat.completions.create(model="bd", messages=m, max_tokens=16, temperature=0.0)
            assert got.choices[0].message.content == text
    finally:
        assert server.stop() == 0, server.log()  # SIGTERM: drain and exit 0
