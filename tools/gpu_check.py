"""One prepared GPU check: kernels, serving engine exactness (eager and CUDA graphs), serving speed and training on
a real GPU, within a time budget; writes DIR/gpu_check.json and DIR/gpu_check.md, exits 1 on any mismatch.

    python tools/gpu_check.py --out runs/gpu_check                 # a machine with one GPU, <= 8 minutes
    python tools/gpu_check.py --out runs/gpu_check_smoke --smoke   # CPU: the same code path at tiny sizes
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from megatron_bdlora.bench.gpu_check import DEFAULT_BUDGET_S, PARTS, run_check


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU (kernels in Triton's interpreter)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for all parts together; a part that would not fit is skipped "
                   f"(default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--commit", help="the commit being checked, recorded when the tree is not a git checkout")
    p.add_argument("--parts",
                   help=f"comma-separated subset of: {', '.join(part.name for part in PARTS)} (default: all)")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.parts:
        unknown = set(args.parts.split(",")) - {part.name for part in PARTS}
        if unknown:
            p.error(f"--parts: unknown part(s) {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --smoke for the CPU-sized check", file=sys.stderr)
        return 2
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run interpreted
    only = tuple(args.parts.split(",")) if args.parts else None
    return run_check(args.out, args.smoke, args.budget_s, args.commit, only)


if __name__ == "__main__":
    sys.exit(main())
