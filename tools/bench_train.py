"""Time one training step (forward + backward + optimizer) per sharding mode on the whole model, at matched parameters.

    python tools/bench_train.py --tp 3 --json runs/bench_train_smollm2.json                  # SmolLM2-135M (3 KV heads)
    python tools/bench_train.py --tp 2 --model-shape llama-3.1-8b --layers 1 --json runs/bench_train_8b.json

Spawns --tp gloo ranks (one thread each). Variants: the frozen base with no adapter (forward + backward of the
activations only: the floor every adapter pays), BD-LoRA at the rank whose parameter count matches LoRA's
(PEFT's rule, nblocks = TP), S-LoRA and replicated at --rank; every adapter on all seven projections. Each
adapter variant trains through the project's own DeepSpeed engine (`training.deepspeed_engine.build_engine`: AdamW,
gradient clipping with the TP-aware norm), one micro-batch of random token ids per step. Models are built once
and their steps interleaved, so drift in machine load hits every variant alike; the table shows the median of
--repeats steps (the slowest rank's time of each) and the collectives of one extra, untimed step by kind.
The base model's weights are random (seeded); SmolLM2's are its real shape with random values too.

The work lives in megatron_bdlora.bench.training_step; this file parses flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_bdlora.bench.training_step import run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags, checked (the rank a multiple of --tp)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=3,
                   help="TP degree = gloo ranks; SmolLM2 (3 KV heads) needs 1 or 3 (default 3)")
    p.add_argument("--model-shape", choices=("llama-3.1-8b", "llama-3.1-70b"), default=None,
                   help="a random Llama with this model's per-layer widths (default: SmolLM2-135M's shape)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default: the model's; 1 with --model-shape)")
    p.add_argument("--rank", type=int, default=None,
                   help="LoRA rank r of S-LoRA and replicated, a multiple of --tp; BD at the matched rank (default: 16 "
                        "rounded up to a multiple of --tp)")
    p.add_argument("--seq-length", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per step (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant, interleaved (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default 0)")
    p.add_argument("--json", type=Path, default=None, help="write the table, settings and machine to this JSON file")
    args = p.parse_args(argv)
    if args.model_shape and not args.layers:
        args.layers = 1
    args.rank = args.rank or -(-16 // args.tp) * args.tp
    if args.rank % args.tp:
        p.error(f"--rank {args.rank} must be a multiple of --tp {args.tp} (S-LoRA shards the rank)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write the JSON; returns what the JSON holds."""
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
