"""How the BD-LoRA / S-LoRA / replicated comparison moves along one axis: tools/bench_serving.py run once per value.

    python tools/bench_sweep.py batch=1,4,8,16 --machine docs/machine_tp2.json --json docs/sweep_batch_tp2.json \\
        --plot docs/sweep_batch_tp2.png -- --tp 2 --model-shape llama-3.1-8b --paper-ranks --bd-ranks 2r --repeats 3

Everything after `--` goes to bench_serving unchanged at every point; the axis sets its own flags on top:
    batch=B      --max-num-seqs B --num-requests B (every decode step holds B requests)
    adapters=K   --num-adapters K (distinct adapters among the requests: at most the requests)
    layers=L     --layers L
One table per command, with every point's full bench_serving result kept in the JSON, which is rewritten after
each point (a stopped sweep keeps what it finished). With --machine (cost_model.py measure's JSON at the same TP),
each point also carries the cost model's predicted BD / S-LoRA decode-step ratio beside the measured one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_bdlora.bench.sweep import AXES, run_sweep


def parse_axis(text: str) -> tuple[str, list[int]]:
    """'batch=1,4,16' -> ('batch', [1, 4, 16]); names the problem otherwise."""
    name, sep, values = text.partition("=")
    if not sep or name not in AXES:
        raise argparse.ArgumentTypeError(f"axis must be NAME=V1,V2,... with NAME one of {sorted(AXES)}, got {text!r}")
    try:
        out = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"axis {name}: values must be integers, got {values!r}") from None
    if not out or min(out) < 1 or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"axis {name}: give distinct integers >= 1, got {values!r}")
    return name, out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The sweep's own flags, and bench_serving's after `--` (checked: the axis sets its flags per point)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, bench = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="bench_serving flags follow `--`.")
    p.add_argument("axis", type=parse_axis, help=f"NAME=V1,V2,... with NAME one of {sorted(AXES)}")
    p.add_argument("--machine", type=Path, default=None,
                   help="cost_model.py measure's JSON at the bench's TP: add the predicted BD / S-LoRA ratio per point")
    p.add_argument("--statistic", default="decode_step_ms_p50", choices=("decode_step_ms_p50", "decode_step_ms_p10"),
                   help="decode-step time the step ratios and the prediction use (default p50)")
    p.add_argument("--json", type=Path, default=None, help="write the table and every point's result here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of the ratios against the axis")
    args = p.parse_args(ours)
    args.axis_name, args.values = args.axis
    clash = [f for f in bench for flag in AXES[args.axis_name] if f == flag or f.startswith(flag + "=")]
    clash += [f for f in bench if f == "--json" or f.startswith(("--json=", "--plot"))]
    if clash:
        p.error(f"bench_serving flags after `--` must not set what the sweep sets per point: {sorted(set(clash))}")
    if "--paper-ranks" not in bench:
        p.error("this sweep compares the paper's systems: pass --paper-ranks after `--`")
    if args.machine is not None and not args.machine.is_file():
        p.error(f"--machine {args.machine}: no such file (make it with tools/cost_model.py measure)")
    args.bench = bench
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep, print its table, write JSON and PNG; returns what the JSON holds."""
    return run_sweep(parse_args(argv))


if __name__ == "__main__":
    main()
