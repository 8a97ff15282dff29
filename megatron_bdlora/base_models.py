"""Base models a run starts from: the embedded SmolLM2, an HF directory, or a random Llama of a given shape,
and their TP-sharded megatron conversions, cached so that concurrent ranks convert once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from megatron_bdlora.atomic import atomic_directory
from megatron_bdlora.checkpoint.base_model import CACHE_NAME, default_cache_dir, ensure_base_model, exclusive_lock
from megatron_bdlora.checkpoint.hf import convert_hf_to_megatron

EMBEDDED = "smollm2-135m-instruct"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def cache_root() -> Path:
    """Cache folder shared with the embedded model ($MEGATRON_BDLORA_CACHE or ./cache)."""
    return default_cache_dir().parent


def _fingerprint(hf_dir: Path, extra: str = "") -> str:
    """Identity of an HF directory's contents (config text + weight file names/sizes/mtimes)."""
    h = hashlib.sha256((hf_dir / "config.json").read_bytes() + extra.encode())
    for f in sorted(hf_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def resolve_hf_base(base: str, random_config: dict | None = None, seed: int = 0) -> Path:
    """The HF model directory of a run's base model (converting / generating it into the cache once)."""
    hf_dir = ensure_base_model() if base in (EMBEDDED, CACHE_NAME) else Path(base)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"base model {base!r}: {hf_dir}/config.json does not exist (an HF model directory or {EMBEDDED!r})"
        )
    if not random_config:
        return hf_dir
    key = json.dumps(random_config, sort_keys=True) + f"/seed={seed}"
    out = cache_root() / f"random-llama-{_fingerprint(hf_dir, key)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out.parent / f".{out.name}.lock"):
        if not (out / "config.json").is_file():
            _write_random_llama(hf_dir, random_config, seed, out)
    return out


def random_base_config(base_config: dict, random_config: dict) -> dict:
    """LlamaConfig fields of the random base model a run's `model.random_config` asks for: the base's vocabulary,
    special tokens and context, then random_config."""
    keep = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
    return {k: base_config[k] for k in keep if k in base_config} | dict(random_config)


def _write_random_llama(tokenizer_dir: Path, random_config: dict, seed: int, out: Path) -> None:
    """A seeded random LlamaForCausalLM with the base's tokenizer (and vocabulary size)."""
    # lazy: transformers' Llama classes take seconds to import and only a random base needs them (serve and the
    # training dry run import this module on their way to a quick answer)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = random_base_config(json.loads((tokenizer_dir / "config.json").read_text()), random_config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float()
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        for name in _TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)


def ensure_megatron_base(hf_dir: Path, tp: int) -> Path:
    """The megatron conversion of an HF directory at this TP, from the cache or converted now (locked)."""
    out = cache_root() / "megatron" / f"{hf_dir.name}-{_fingerprint(hf_dir)}-tp{tp}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out.parent / f".{out.name}.lock"):
        if not (out / "meta.json").is_file():
            convert_hf_to_megatron(hf_dir, out, tp, overwrite=out.exists())
    return out
