"""Test helpers for serving: a small random Llama with a real tokenizer, random BD adapters on disk, and the
independent reference (the adapter merged into the base weights, full recompute with no KV cache)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft_reference import random_factors

from megatron_bdlora.config import ALL_TARGETS, LoRASettings

SERVE_LLAMA = dict(  # 4 KV heads: TP 1, 2 and 4; SmolLM2's tokenizer and vocabulary
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=256,
    rope_theta=50000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def serve_base(tp: int) -> Path:
    """The random Llama's megatron checkpoint at this TP (built once into the project cache)."""
    from megatron_bdlora.base_models import ensure_megatron_base, resolve_hf_base

    return ensure_megatron_base(resolve_hf_base("smollm2-135m-instruct", random_config=SERVE_LLAMA, seed=0), tp)


def adapter_settings(tp: int) -> dict[str, LoRASettings]:
    """BD adapters with different ranks (multiples of their nblocks), targets, rsLoRA, and one with nblocks = 2 * TP."""
    return {
        "a0": LoRASettings(rank=4 * tp, alpha=16, nblocks=tp),
        "a1": LoRASettings(
            rank=2 * tp, alpha=8, use_rslora=True, nblocks=tp, targets=("q_proj", "v_proj", "o_proj", "down_proj")
        ),
        "a2": LoRASettings(rank=4 * tp, alpha=8, nblocks=2 * tp),
        "a3": LoRASettings(rank=8 * tp, alpha=32, nblocks=tp, targets=("k_proj", "gate_proj", "up_proj")),
        "a4": LoRASettings(rank=2 * tp, alpha=4, nblocks=tp, targets=ALL_TARGETS),
    }


def write_adapters(root: Path, meg_dir: Path, tp: int, names: list[str], scale: float = 0.2) -> dict[str, str]:
    """Native BD checkpoints with non-zero random factors (entries ~ scale); name -> directory."""
    from megatron_bdlora.checkpoint.adapters import AdapterCheckpoint, save_native

    hf_config = json.loads((meg_dir / "config.json").read_text())
    out = {}
    for i, name in enumerate(names):
        settings = adapter_settings(tp)[name]
        factors = random_factors(hf_config, settings, seed=100 + i, scale=scale)
        out[name] = str(save_native(AdapterCheckpoint(settings, hf_config, tp, factors), root / name, overwrite=True))
    return out


@torch.no_grad()
def merged_references(
    meg_dir: Path,
    tp: int,
    tp_rank: int,
    adapters: dict[str, str],
    mode: str,
    requests: list[tuple[list[int], str | None, int]],
) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Per request (prompt, adapter or None, steps), alone: greedy tokens and last-token logits per step with the
    adapter merged into the base weights and the whole sequence recomputed (no KV cache) every step."""
    from megatron_bdlora.checkpoint.hf import load_megatron_rank_state
    from megatron_bdlora.inference.adapter_slots import read_adapter
    from megatron_bdlora.layers import LoRAParallelLinear
    from megatron_bdlora.model import build_model, forward_logits, load_base_state_dict, load_full_adapter

    hf_config = json.loads((meg_dir / "config.json").read_text())
    base_state = load_megatron_rank_state(meg_dir, tp_rank, tp)
    out: list = [None] * len(requests)
    for name in dict.fromkeys(a for _, a, _ in requests):
        ckpt = None if name is None else read_adapter(adapters[name], hf_config, tp, mode)
        model = build_model(hf_config, tp, None if ckpt is None else ckpt.settings)
        load_base_state_dict(model, base_state)
        if ckpt is not None:
            load_full_adapter(model, ckpt.factors, scaling=ckpt.settings.scaling)
            for module in model.modules():
                if isinstance(module, LoRAParallelLinear):
                    module.merge_lora()
        model.eval()
        for i, (prompt, adapter, steps) in enumerate(requests):
            if adapter != name:
                continue
            ids, tokens, logits = list(prompt), [], []
            for _ in range(steps):
                last = forward_logits(model, torch.tensor([ids]))[0, -1].float()
                logits.append(last)
                tokens.append(int(last.argmax()))
                ids.append(tokens[-1])
            out[i] = (tokens, logits)
        del model
    return out
