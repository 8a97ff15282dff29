"""The one way an adapter directory comes into a model: training's lora.init, generation and serving read it here.

A directory is native (adapter_manifest.json) or PEFT (adapter_config.json). Its files are read into memory once
(`AdapterFiles.read`: names and bytes, with a sha256 `digest` over them) and parsed from those bytes, so that a
server can check that a later reading is the same adapter and that every rank serves the bytes it validated. A
native adapter is checked against the base model before any factor is parsed; a PEFT one, which records no base
shape, by the shape of every tensor. The whole adapter is then converted to the TP degree and sharding mode asked
for, exactly or not at all (checkpoint/reshard.py). Callers take what they need from the one result: `settings`
to build the model with, `plans()` and `rank_state(tp_rank)` for their rank's slices, `settings.scaling`.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from megatron_bdlora.checkpoint.adapters import (
    MANIFEST_NAME,
    PEFT_CONFIG_NAME,
    AdapterCheckpoint,
    AdapterFiles,
    load_native,
)
from megatron_bdlora.checkpoint.peft import import_peft
from megatron_bdlora.checkpoint.reshard import reshard
from megatron_bdlora.sharding import Mode


def adapter_kind(files: AdapterFiles) -> Literal["native", "peft"]:
    """Which reader the files need; FileNotFoundError naming both kinds for anything else."""
    if files.has(MANIFEST_NAME):
        return "native"
    if files.has(PEFT_CONFIG_NAME):
        return "peft"
    raise FileNotFoundError(
        f"{files.directory} is neither a native adapter ({MANIFEST_NAME}) nor a PEFT adapter ({PEFT_CONFIG_NAME})"
    )


def read_adapter(
    source: str | os.PathLike | AdapterFiles,
    base_config: Any,
    tp: int,
    mode: Mode | str | None = None,
    *,
    plain_lora_mode: Mode | str = Mode.REPLICATED,
) -> AdapterCheckpoint:
    """A native or PEFT adapter (a directory, or its files already read) as a whole adapter for this base model at
    this TP degree and mode.

    mode None keeps the adapter's own mode: a native adapter's, block-diagonal for a PEFT `use_bdlora` adapter,
    plain_lora_mode for a plain PEFT LoRA (which has none). Raises FileNotFoundError or AdapterCheckpointError.
    """
    files = AdapterFiles.of(source)
    if adapter_kind(files) == "native":
        return reshard(load_native(files, base_config), tp, mode)
    return import_peft(files, base_config, tp, mode, plain_lora_mode=plain_lora_mode)
