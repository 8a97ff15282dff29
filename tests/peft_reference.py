"""Test helpers: random adapters in PEFT's stored layout, random Llamas, and the transformers + PEFT reference model
(`peft_model`, which lives in megatron_bdlora.bench.peft_reference: the GPU check needs it at run time too)."""

from __future__ import annotations

import torch

from megatron_bdlora.bench.peft_reference import Factors, peft_model  # noqa: F401  (re-exported for the tests)
from megatron_bdlora.config import LoRASettings
from megatron_bdlora.targets import lora_plan


def random_factors(hf_config: dict, settings: LoRASettings, seed: int, scale: float = 0.05) -> Factors:
    """Non-zero A and B for every layer and target, in the stored (PEFT) shapes for the settings' nblocks."""
    g = torch.Generator().manual_seed(seed)
    tp_for_shapes = settings.nblocks or 1
    out = {}
    for layer in range(hf_config["num_hidden_layers"]):
        for proj in settings.targets:
            plan = lora_plan(hf_config, proj, settings, tp_for_shapes)
            a = torch.randn(plan.a.full_shape, generator=g) * scale
            b = torch.randn(plan.b.full_shape, generator=g) * scale
            out[(layer, proj)] = (a, b)
    return out


RANDOM_LLAMA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_hidden_layers=2,
    vocab_size=250,  # not a multiple of 4: vocab padding is exercised
    max_position_embeddings=128,
    rope_theta=50000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


# Llama-3.1 RoPE scaling (factor 8, low/high frequency factors 1 and 4) on 16-dim heads, its pretraining context
# scaled from 8192 down to 64 positions: frequencies with wavelengths below 16 stay, above 64 are divided by 8,
# in between are smoothed; a LLAMA3_ROPE_SEQ-token batch runs well past both boundaries.
LLAMA3_ROPE_LLAMA = dict(
    RANDOM_LLAMA,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    max_position_embeddings=512,
    rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    ),
)
LLAMA3_ROPE_SEQ = 96
ATTENTION_GAIN = 8.0  # q/k weights scaled up: sharp attention, so positions (and their RoPE) move the logits


def make_random_llama(
    root, tps: tuple[int, ...], config: dict = RANDOM_LLAMA, seq_len: int = 12, attention_gain: float = 1.0
):
    """A seeded random GQA Llama saved as HF at root/hf, converted to megatron at root/meg_tp{N}; plus a batch.

    attention_gain multiplies the q and k projections. Returns (hf_model, input_ids [2, seq_len], attention_mask
    with left padding on row 1).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_bdlora.checkpoint.hf import convert_hf_to_megatron

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(attention_gain)
            layer.self_attn.k_proj.weight.mul_(attention_gain)
    model.save_pretrained(root / "hf")
    for tp in tps:
        convert_hf_to_megatron(root / "hf", root / f"meg_tp{tp}", tp, progress=False)
    ids = torch.randint(0, config["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return model, ids, mask
