"""Time a TP column->row pair (an MLP block) with no adapter, BD-LoRA, S-LoRA and replicated LoRA.

    python tools/bench_layers.py --tp 2 --json runs/bench_layers.json

Spawns `--tp` gloo ranks on this machine (one CPU thread each). The block is megatron's
ColumnParallelLinear d_model -> d_ffn followed by RowParallelLinear d_ffn -> d_model (no bias, no activation),
input [seq, batch, d_model], in training mode: base frozen, adapters trainable, input requires grad.
S-LoRA and replicated use `--rank`; BD-LoRA uses the largest rank (a multiple of nblocks = tp) whose adapter
parameter count does not exceed theirs (PEFT's matching rule). Repeats are interleaved across variants so
that drift in machine load hits every variant alike; each repeat's time is the slowest rank's, and the
table reports the median. Collectives are counted in one extra, untimed forward and backward.

The work lives in megatron_bdlora.bench.layers; this file parses flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_bdlora.bench.layers import DTYPES, matched_ranks, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags, checked (sizes >= 1)."""
    p = argparse.ArgumentParser(
        description="Time forward and forward+backward of a TP column->row MLP pair with no adapter, BD-LoRA, "
        "S-LoRA and replicated LoRA at matched adapter parameter counts (local gloo ranks on CPU).",
    )
    p.add_argument("--tp", type=int, default=2,
                   help="tensor-parallel degree = number of local gloo ranks spawned; also BD's nblocks (default 2)")
    p.add_argument("--json", type=Path, default=None,
                   help="write config, environment and all rows (with per-repeat times) to this JSON file")
    p.add_argument("--d-model", type=int, default=1024,
                   help="hidden size: column input and row output width (default 1024)")
    p.add_argument("--d-ffn", type=int, default=2816,
                   help="MLP width: column output and row input width, split over TP (default 2816)")
    p.add_argument("--seq", type=int, default=128, help="sequence length s of the [s, b, d_model] input (default 128)")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size b of the [s, b, d_model] input (default 4)")
    p.add_argument("--rank", type=int, default=16,
                   help="LoRA rank of S-LoRA and replicated; BD's rank is matched to its parameter count (default 16)")
    p.add_argument("--repeats", type=int, default=20,
                   help="timed repeats per variant; the table reports the median (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repeats per variant before timing (default 3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="parameter and activation dtype (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base weights and the input (default 0)")
    args = p.parse_args(argv)
    for flag in ("tp", "d_model", "d_ffn", "seq", "batch", "rank", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write the JSON; returns what the JSON holds."""
    args = parse_args(argv)
    try:
        ranks = matched_ranks(args.d_model, args.d_ffn, args.tp, args.rank)
    except ValueError as e:
        sys.exit(f"bench_layers: {e}")
    return run(args, ranks)


if __name__ == "__main__":
    main()
