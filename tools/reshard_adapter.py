"""Reshard a native megatron-bdlora adapter for another TP degree, and change its mode where that is exact.

    python tools/reshard_adapter.py --adapter-dir runs/adapter_tp4 --out-dir runs/adapter_tp2 --tp 2

block_diagonal -> slora / replicated is always exact; into block_diagonal only if the factor that must be
block-diagonal already is. A BD adapter keeps its nblocks, so --tp must divide it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_bdlora.checkpoint.reshard import reshard_directory
from megatron_bdlora.sharding import Mode

MODES = tuple(m.value for m in Mode)  # the sharding plan owns the list


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every flag documented for --help."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--adapter-dir", type=Path, required=True, metavar="DIR",
        help="native adapter checkpoint to read (adapter_manifest.json + rank_XX.safetensors)",
    )
    p.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR",
        help="native adapter directory to write; written atomically, must not exist unless --overwrite",
    )
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel degree to shard the adapter for")
    p.add_argument(
        "--mode", choices=MODES,
        help="sharding mode of the output (default: keep the adapter's mode)",
    )
    p.add_argument(
        "--nblocks", type=int,
        help="block_diagonal only: blocks of the block-diagonal factor (default: keep a BD adapter's nblocks, "
        "else --tp); fewer blocks is always exact, more only if the factor is that block-diagonal",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out-dir if it already exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = reshard_directory(
            args.adapter_dir, args.out_dir, args.tp, args.mode, args.nblocks, overwrite=args.overwrite
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    print(f"wrote native adapter {out} (tp={args.tp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
