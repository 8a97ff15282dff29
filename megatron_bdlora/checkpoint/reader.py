"""The one way an adapter directory comes into a model: training's lora.init, generation and serving read it here.

A directory is native (adapter_manifest.json) or PEFT (adapter_config.json). A native adapter is checked against
the base model before any factor is read; a PEFT one, which records no base shape, by the shape of every tensor.
The whole adapter is then converted to the TP degree and sharding mode asked for, exactly or not at all
(checkpoint/reshard.py). Callers take what they need from the one result: `settings` to build the model with,
`plans()` and `rank_state(tp_rank)` for their rank's slices, `settings.scaling`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from megatron_bdlora.checkpoint.adapters import MANIFEST_NAME, PEFT_CONFIG_NAME, AdapterCheckpoint, load_native
from megatron_bdlora.checkpoint.peft import import_peft
from megatron_bdlora.checkpoint.reshard import reshard
from megatron_bdlora.sharding import Mode


def adapter_kind(path: Path) -> Literal["native", "peft"]:
    """Which reader a directory needs, from the files present; FileNotFoundError naming both for anything else."""
    if (path / MANIFEST_NAME).is_file():
        return "native"
    if (path / PEFT_CONFIG_NAME).is_file():
        return "peft"
    raise FileNotFoundError(
        f"{path} is neither a native adapter ({MANIFEST_NAME}) nor a PEFT adapter ({PEFT_CONFIG_NAME})"
    )


def read_adapter(
    path: str | os.PathLike,
    base_config: Any,
    tp: int,
    mode: Mode | str | None = None,
    *,
    plain_lora_mode: Mode | str = Mode.REPLICATED,
) -> AdapterCheckpoint:
    """A native or PEFT adapter directory as a whole adapter for this base model at this TP degree and mode.

    mode None keeps the adapter's own mode: a native adapter's, block-diagonal for a PEFT `use_bdlora` adapter,
    plain_lora_mode for a plain PEFT LoRA (which has none). Raises FileNotFoundError or AdapterCheckpointError.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter path {path} does not exist or is not a directory")
    if adapter_kind(path) == "native":
        stored = load_native(path, base_config)
        return reshard(stored, tp, mode)
    return import_peft(path, base_config, tp, mode, plain_lora_mode=plain_lora_mode)
