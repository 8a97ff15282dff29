"""RoPE settings read from a Hugging Face Llama config: the base theta and Llama-3.1 frequency scaling.

Kept apart from the model builder so that config checks (the trainer's dry run) need not import megatron.
Field names and defaults are transformers': `rope_scaling` (config.json of transformers 4.x) or
`rope_parameters` (5.x), a missing original_max_position_embeddings falling back to max_position_embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1 RoPE frequency scaling (`rope_type: llama3`), with transformers' field names."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


def _rope_block(hf_config: dict) -> dict:
    return hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}


def rope_theta(hf_config: dict) -> float:
    """The RoPE base (rope_theta at top level or inside rope_parameters; 10000 when absent, as in transformers)."""
    params = hf_config.get("rope_parameters") or {}
    return float(hf_config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def llama3_rope_scaling(hf_config: dict) -> Llama3RopeScaling | None:
    """The config's Llama-3.1 scaling, None for plain RoPE; another scheme or a missing field is a ValueError."""
    rs = _rope_block(hf_config)
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"rope_scaling rope_type={kind!r} is not supported (default or Llama-3.1 'llama3' only): {rs}")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if rs.get(k) is None]
    if missing:
        raise ValueError(f"llama3 rope_scaling {rs} lacks {missing}")
    original = rs.get("original_max_position_embeddings") or hf_config.get("max_position_embeddings")
    if original is None:
        raise ValueError(
            f"llama3 rope_scaling {rs} lacks original_max_position_embeddings (and the config max_position_embeddings)"
        )
    return Llama3RopeScaling(
        float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]), int(original)
    )
