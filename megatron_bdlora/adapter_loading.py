"""Load an adapter directory (native or PEFT) into a model built at any TP degree.

A native checkpoint written at the same TP is read rank by rank; at another TP it is resharded in memory
(exact, see checkpoint/reshard.py). A PEFT directory is imported exactly: `use_bdlora` adapters in BD mode,
plain LoRA in the requested mode (replicated by default, as vLLM serves them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from megatron_bdlora.config import LoRASettings

PEFT_CONFIG = "adapter_config.json"
NATIVE_MANIFEST = "adapter_manifest.json"


def adapter_kind(adapter_dir: Path) -> str:
    """'native' or 'peft', from the files present; a clear error for anything else."""
    if (adapter_dir / NATIVE_MANIFEST).is_file():
        return "native"
    if (adapter_dir / PEFT_CONFIG).is_file():
        return "peft"
    raise FileNotFoundError(f"{adapter_dir} is neither a native adapter ({NATIVE_MANIFEST}) nor a PEFT adapter ({PEFT_CONFIG})")


def load_adapter_for_model(
    adapter_dir: str | Path, hf_config: dict, tp: int, tp_rank: int, plain_lora_mode: str = "replicated"
) -> tuple[LoRASettings, Callable[[torch.nn.Module], None]]:
    """(settings to build the model with, loader that puts this rank's slices into the built model)."""
    from megatron_bdlora.checkpoint.adapters import (
        check_compatible,
        load_native,
        load_native_rank,
        read_manifest,
        settings_from_manifest,
    )
    from megatron_bdlora.checkpoint.peft import import_peft
    from megatron_bdlora.checkpoint.reshard import reshard
    from megatron_bdlora.model import load_adapter_state_dict

    adapter_dir = Path(adapter_dir)
    if adapter_kind(adapter_dir) == "native":
        manifest = read_manifest(adapter_dir)
        settings = settings_from_manifest(manifest)
        if int(manifest["tp"]) == tp:
            state = load_native_rank(adapter_dir, tp_rank, hf_config, tp, settings)
        else:  # the same base-model check as the same-TP path, at the adapter's own TP, before resharding
            check_compatible(manifest, hf_config, int(manifest["tp"]), adapter_dir=adapter_dir)
            state = reshard(load_native(adapter_dir), tp).rank_state(tp_rank)
    else:
        import json

        bd = bool(json.loads((adapter_dir / PEFT_CONFIG).read_text()).get("use_bdlora"))
        ckpt = import_peft(adapter_dir, hf_config, tp, "block_diagonal" if bd else plain_lora_mode)
        settings, state = ckpt.settings, ckpt.rank_state(tp_rank)
    return settings, lambda model: load_adapter_state_dict(model, state)
