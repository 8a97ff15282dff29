"""Where each Hugging Face projection name lives in a Llama-architecture layer: kind, shape, fused slot.

Users name LoRA targets as PEFT does (q_proj ... down_proj); megatron fuses them into linear_qkv
([q; k; v] per query group), linear_proj, linear_fc1 ([gate; up] per TP rank) and linear_fc2.
Model building, adapter checkpoints and PEFT conversion all take shapes and plans from here; which layer fuses
which projection, and its kind, come from the projection table (`config.FUSED_LAYERS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_bdlora.config import ALL_TARGETS, FUSED_LAYERS, LoRASettings
from megatron_bdlora.rope import llama3_rope_scaling
from megatron_bdlora.sharding import LayerKind, ShardingPlan


@dataclass(frozen=True)
class Projection:
    """One HF projection of a decoder layer and the megatron layer that carries it."""

    name: str  # HF name: q_proj, ...
    megatron_layer: str  # linear_qkv, linear_proj, linear_fc1, linear_fc2
    hf_module: str  # "self_attn" or "mlp"
    kind: LayerKind
    d_in: int
    d_out: int


def cfg_field(hf_config: Any, key: str, default: Any = None) -> Any:
    """A config field (object or dict); a missing required field is a ValueError naming it."""
    value = hf_config.get(key) if isinstance(hf_config, dict) else getattr(hf_config, key, None)
    if value is None:
        value = default
    if value is None:
        raise ValueError(f"HF config has no {key!r}")
    return value


def check_tp_layout(hf_config: dict, tp: int, error: type[ValueError] = ValueError) -> None:
    """Reject configs whose weights megatron's TP layout cannot carry exactly (what the checkpoint converter needs),
    naming the field and value; `error`: the ValueError subclass to raise."""
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or ["LlamaForCausalLM"]
    if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
        raise error(
            f"not a Llama checkpoint: model_type={model_type!r}, architectures={archs} "
            "(expected model_type='llama', architectures=['LlamaForCausalLM'])"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            raise error(f"{key}=true is not supported (Llama without biases only)")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise error(f"hidden_act={hf_config['hidden_act']!r} is not supported (silu only)")
    if not isinstance(tp, int) or tp < 1:
        raise error(f"tp={tp!r} must be a positive integer")
    heads = cfg_field(hf_config, "num_attention_heads")
    kv = cfg_field(hf_config, "num_key_value_heads", heads)
    ffn = cfg_field(hf_config, "intermediate_size")
    if heads % kv:
        raise error(f"num_key_value_heads={kv} does not divide num_attention_heads={heads}")
    for key, value in (("num_attention_heads", heads), ("num_key_value_heads", kv), ("intermediate_size", ffn)):
        if value % tp:
            raise error(f"tp={tp} does not divide {key}={value}")


def check_llama_config(hf_config: dict, tp: int) -> None:
    """Reject what our model cannot be built from exactly at this TP degree: the TP layout's checks, plus RoPE
    scaling. Needs no megatron import (the trainer's dry run calls it)."""
    check_tp_layout(hf_config, tp)
    llama3_rope_scaling(hf_config)


def llama_projections(hf_config: Any) -> dict[str, Projection]:
    """The seven projections of one layer with their (d_in, d_out), from an HF LlamaConfig (object or dict)."""
    h = cfg_field(hf_config, "hidden_size")
    heads = cfg_field(hf_config, "num_attention_heads")
    kv = cfg_field(hf_config, "num_key_value_heads", heads)
    hd = cfg_field(hf_config, "head_dim", h // heads)
    ffn = cfg_field(hf_config, "intermediate_size")
    shapes = {  # (d_in, d_out)
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, ffn),
        "up_proj": (h, ffn),
        "down_proj": (ffn, h),
    }
    return {
        name: Projection(name, layer.name, layer.hf_module, layer.kind, *shapes[name])
        for layer in FUSED_LAYERS
        for name in layer.projections
    }


def lora_plan(hf_config: Any, proj: str, settings: LoRASettings, tp: int) -> ShardingPlan:
    """The sharding plan of one projection's adapter at this TP degree."""
    if proj not in ALL_TARGETS:
        raise ValueError(f"unknown projection {proj!r}; expected one of {list(ALL_TARGETS)}")
    p = llama_projections(hf_config)[proj]
    return ShardingPlan.build(p.kind, settings.mode, p.d_in, p.d_out, settings.rank, tp, settings.nblocks_for(tp))
