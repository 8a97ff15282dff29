"""The multi-adapter LoRA kernels (Triton) against the torch path: correctness first, then speed on a GPU.

    python tools/bench_kernels.py --json runs/bench_kernels.json          # a GPU: checks, then the timing sweep
    python tools/bench_kernels.py --json runs/bench_kernels_cpu.json      # no GPU: the checks, in Triton's interpreter

1. Checks: on fresh random inputs, for every sharding mode and layer kind, a mixed batch (uneven segments,
   several ranks and block counts, tokens without an adapter) through ops.lora_shrink + lora_expand on the
   Triton and the torch backends; max error relative to the output's scale, per dtype (fp32, fp16, and bf16 on
   a GPU). On CPU the shapes are scaled down and Triton runs in its interpreter.
2. Timing (GPU only): one LoRA branch on one TP rank (shrink then expand, the plan's collective excluded) at
   the per-rank shapes of Llama-3.1-8B and 70B at TP=8 (q, gate: column; o, down: row), each mode. Decode:
   1-256 tokens spread over 1-64 adapters, ranks 8-128; prefill: 512-8192 tokens. CUDA events, median of
   --reps; the Triton path replayed from a CUDA graph (its launch metadata is graph-safe), the torch path
   run eagerly (it syncs once per step to plan its per-slot loop). Achieved GB/s counts the bytes that must
   move (the active adapters' factors, x, the rank space, the output read and written) against the copy
   bandwidth measured here. The sweep stops early, keeping what it measured, after --budget-s seconds.

The work lives in megatron_bdlora.bench.kernels (shared with the GPU check's "kernels" part); this file parses
flags, prints and writes the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from megatron_bdlora.atomic import atomic_write_text

# Without a GPU, importing megatron_bdlora.bench.kernels sets TRITON_INTERPRET=1 (unless set) before anything can
# import the Triton kernels, which read it once, when they are defined (see the comment there); so nothing imported
# above it may import them.
from megatron_bdlora.bench.kernels import (
    DECODE,
    DECODE_RANKS,
    INTERPRETER_SCALE,
    MODES,  # noqa: F401  (unused here: tests/tools/test_bench_kernels.py reads it from this tool)
    PREFILL,
    PREFILL_RANKS,
    check,
    check_dtypes,
    copy_bandwidth,
    format_checks,
    format_timings,
    sweep,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write checks, timings and the environment here")
    p.add_argument("--reps", type=int, default=50, help="timed runs per configuration (median reported)")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop the timing sweep after this many seconds")
    p.add_argument("--check-scale", type=int, default=0,
                   help="divide the checks' layer widths by this (default: 1 on a GPU, 64 in the interpreter)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="dtype of the timing sweep")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.monotonic()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    checks = check(device, check_dtypes(gpu), args.check_scale or (1 if gpu else INTERPRETER_SCALE))
    print(f"correctness: Triton vs torch on {'the GPU' if gpu else 'CPU (Triton interpreter)'}")
    print(format_checks(checks))
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()})",
                  torch=torch.__version__, checks=checks, checks_ok=all(r["ok"] for r in checks))
    if gpu:
        import triton  # lazy: only the GPU sweep needs it, imported after bench.kernels settled TRITON_INTERPRET

        result["triton"] = triton.__version__
        result["copy_gbs"] = copy_bandwidth(device)
        print(f"\ndevice copy bandwidth: {result['copy_gbs']:.0f} GB/s")
        deadline = start + args.budget_s
        dtype = getattr(torch, args.dtype)
        result["decode"] = sweep("decode", DECODE, DECODE_RANKS, args.reps, deadline, result["copy_gbs"], dtype)
        result["prefill"] = sweep("prefill", PREFILL, PREFILL_RANKS, args.reps, deadline, result["copy_gbs"], dtype)
        decode = result["decode"]
        result["summary"] = dict(
            decode_configs=len(decode), prefill_configs=len(result["prefill"]),
            decode_min_bandwidth_share=min((r["bandwidth_share"] for r in decode), default=None),
            decode_median_bandwidth_share=statistics.median([r["bandwidth_share"] for r in decode]) if decode else None,
            decode_min_speedup=min((r["speedup"] for r in decode), default=None),
            prefill_min_speedup=min((r["speedup"] for r in result["prefill"]), default=None),
            stopped_early=time.monotonic() > deadline,
        )
        print("\ndecode\n" + format_timings(decode) + "\n\nprefill\n" + format_timings(result["prefill"]))
        print("\nsummary: " + json.dumps(result["summary"]))
    result["elapsed_s"] = time.monotonic() - start
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["checks_ok"] else 1)
