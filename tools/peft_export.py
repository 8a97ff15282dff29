"""Export a native megatron-bdlora adapter checkpoint as a PEFT adapter (PeftModel.from_pretrained loads it).

    python tools/peft_export.py --adapter-dir runs/adapter --out-dir runs/adapter_peft

Block-diagonal adapters export as PEFT BD-LoRA (use_bdlora); S-LoRA and replicated ones as plain LoRA.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every flag documented for --help."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--adapter-dir", type=Path, required=True, metavar="DIR",
        help="native adapter checkpoint (adapter_manifest.json + rank_XX.safetensors)",
    )
    p.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR",
        help="PEFT adapter directory to write (adapter_config.json + adapter_model.safetensors); "
        "written atomically, must not exist unless --overwrite",
    )
    p.add_argument(
        "--base-model-name", metavar="NAME",
        help="base_model_name_or_path to record in adapter_config.json (default: the one in the manifest)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out-dir if it already exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_bdlora.checkpoint.peft import export_peft_directory  # lazy: --help and bad flags answer without torch

    try:
        out = export_peft_directory(
            args.adapter_dir, args.out_dir, base_model_name=args.base_model_name, overwrite=args.overwrite
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    print(f"wrote PEFT adapter {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
