"""Serving the embedded SmolLM2-135M-Instruct at TP=3 over HTTP: an adapter written by PEFT itself (use_bdlora,
nblocks 3) and the base model, requested concurrently so they share decode steps, against transformers (+ PEFT).
Mixed streams of several BD adapters against merged full recompute: test_serving_loop.py (random Llamas)."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from live_server import LiveServer
from peft_reference import peft_model, random_factors

from megatron_bdlora.config import LoRASettings

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2():
    from megatron_bdlora.base_models import ensure_megatron_base, resolve_hf_base

    hf_dir = resolve_hf_base("smollm2-135m-instruct")
    return hf_dir, ensure_megatron_base(hf_dir, 3)


def test_peft_made_bd_adapter_served_at_tp3_over_http_returns_peft_greedy_text(smollm2, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    hf_dir, _ = smollm2
    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_config = hf_model.config.to_dict()
    settings = LoRASettings(rank=6, alpha=12, nblocks=3)
    ref = peft_model(copy.deepcopy(hf_model), settings, random_factors(hf_config, settings, seed=5, scale=0.15))
    ref.save_pretrained(tmp_path / "peft_bd")  # PEFT's own files: adapter_config.json with use_bdlora, packed factors
    messages = [
        [{"role": "user", "content": q}]
        for q in ("What is the capital of France?", "Write one sentence about the sea.")
    ]
    gen = GenerationConfig(do_sample=False, max_new_tokens=16, pad_token_id=tok.pad_token_id)
    want, base_text = [], []
    with torch.no_grad():
        for m in messages:
            ids = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
            out = ref.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                generation_config=gen,
            )
            want.append(tok.decode(out[0, len(ids):], skip_special_tokens=True))
            base = hf_model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                generation_config=gen,
            )
            base_text.append(tok.decode(base[0, len(ids):], skip_special_tokens=True))
    assert base_text != want, "adapter too weak to test anything: PEFT's text equals the base model's"
    # no --megatron-dir: the embedded SmolLM2, converted for TP=3 and cached
    server = LiveServer(3, ["--mode", "block_diagonal", "--adapter", f"bd={tmp_path / 'peft_bd'}", "--max-loras", "2",
                            "--max-model-len", "256", "--kv-cache-gb", "0.1"])
    try:
        base_name = server.client.models.list().data[0].id
        jobs = [
            (name, m, text)
            for m, text, base in zip(messages, want, base_text)
            for name, text in (("bd", text), (base_name, base))
        ]
        with ThreadPoolExecutor(len(jobs)) as pool:  # one mixed batch: adapter and base rows in the same steps
            answers = list(pool.map(lambda job: server.client.chat.completions.create(
                model=job[0], messages=job[1], max_tokens=16, temperature=0.0).choices[0].message.content, jobs))
        for (name, _, text), got in zip(jobs, answers):
            assert got == text, f"{name}: {got!r} vs transformers' {text!r}"
    finally:
        assert server.stop() == 0, server.log()  # SIGTERM: drain and exit 0
