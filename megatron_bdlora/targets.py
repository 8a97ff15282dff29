"""Where each Hugging Face projection name lives in a Llama-architecture layer: kind, shape, fused slot.

Users name LoRA targets as PEFT does (q_proj ... down_proj); megatron fuses them into linear_qkv
([q; k; v] per query group), linear_proj, linear_fc1 ([gate; up] per TP rank) and linear_fc2.
Model building, adapter checkpoints and PEFT conversion all take shapes and plans from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_bdlora.config import ALL_TARGETS, LoRASettings
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


def llama_projections(hf_config: Any) -> dict[str, Projection]:
    """The seven projections of one layer with their (d_in, d_out), from an HF LlamaConfig (object or dict)."""
    h = cfg_field(hf_config, "hidden_size")
    heads = cfg_field(hf_config, "num_attention_heads")
    kv = cfg_field(hf_config, "num_key_value_heads", heads)
    hd = cfg_field(hf_config, "head_dim", h // heads)
    ffn = cfg_field(hf_config, "intermediate_size")
    col, row = LayerKind.COLUMN, LayerKind.ROW
    rows = [
        ("q_proj", "linear_qkv", "self_attn", col, h, heads * hd),
        ("k_proj", "linear_qkv", "self_attn", col, h, kv * hd),
        ("v_proj", "linear_qkv", "self_attn", col, h, kv * hd),
        ("o_proj", "linear_proj", "self_attn", row, heads * hd, h),
        ("gate_proj", "linear_fc1", "mlp", col, h, ffn),
        ("up_proj", "linear_fc1", "mlp", col, h, ffn),
        ("down_proj", "linear_fc2", "mlp", row, ffn, h),
    ]
    return {r[0]: Projection(*r) for r in rows}


def lora_plan(hf_config: Any, proj: str, settings: LoRASettings, tp: int) -> ShardingPlan:
    """The sharding plan of one projection's adapter at this TP degree."""
    if proj not in ALL_TARGETS:
        raise ValueError(f"unknown projection {proj!r}; expected one of {list(ALL_TARGETS)}")
    p = llama_projections(hf_config)[proj]
    return ShardingPlan.build(p.kind, settings.mode, p.d_in, p.d_out, settings.rank, tp, settings.nblocks_for(tp))
