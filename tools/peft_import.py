"""Import a PEFT LoRA or BD-LoRA adapter as a native megatron-bdlora checkpoint sharded for a TP degree.

    python tools/peft_import.py --peft-dir adapter_peft --out-dir runs/adapter --tp 4 --mode block_diagonal \\
        [--base-config base/config.json]

The base model's shapes come from --base-config, or by default from the adapter's own base_model_name_or_path
(adapter_config.json) when that is a local model directory.

Every conversion is exact or refused: BD-LoRA imports into any mode (into block_diagonal when TP divides its
nblocks); plain LoRA into slora / replicated, and into block_diagonal only if its factors are block-diagonal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_bdlora.checkpoint.peft import import_peft_directory
from megatron_bdlora.sharding import Mode

MODES = tuple(m.value for m in Mode)  # the sharding plan owns the list


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every flag documented for --help."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--peft-dir", type=Path, required=True, metavar="DIR",
        help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
    )
    p.add_argument(
        "--base-config", type=Path, metavar="PATH",
        help="the base model's HF config.json, or a model directory containing one (shapes and layer count); "
        "default: the adapter's base_model_name_or_path from adapter_config.json, if it is a local model directory",
    )
    p.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR",
        help="native adapter directory to write; written atomically, must not exist unless --overwrite",
    )
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel degree to shard the adapter for")
    p.add_argument(
        "--mode", choices=MODES, required=True,
        help="sharding mode: block_diagonal (BD-LoRA, no extra communication), slora (rank sharded, "
        "needs rank %% tp == 0) or replicated (half of each adapter on every rank)",
    )
    p.add_argument(
        "--nblocks", type=int,
        help="block_diagonal only: blocks of the block-diagonal factor, a multiple of --tp "
        "(default: the adapter's own nblocks for BD-LoRA, --tp for plain LoRA)",
    )
    p.add_argument(
        "--base-model-name", metavar="NAME",
        help="base model name to record in the manifest (default: the adapter's base_model_name_or_path)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out-dir if it already exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = import_peft_directory(
            args.peft_dir, args.out_dir, args.base_config, args.tp, args.mode, args.nblocks,
            base_model_name=args.base_model_name, overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    print(f"wrote native adapter {out} (tp={args.tp}, mode={args.mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
