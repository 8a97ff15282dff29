"""A cost model of one decode step per sharding mode: base + LoRA bytes/FLOPs + the collectives the plan issues.

    python tools/cost_model.py measure --tp 2 --json runs/machine_tp2.json        # calibrate on this machine
    python tools/cost_model.py validate --bench runs/paper_tp2_8b.json --machine runs/machine_tp2.json
    python tools/cost_model.py predict --model llama-3.1-8b --tp 8 --machine a100-nvlink --json runs/predict_8b.json

The model, its terms and where each number comes from: megatron_bdlora.bench.cost_model. This file parses flags,
prints and writes the JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_bdlora.bench.cost_model import (
    PAPER,
    PUBLISHED,
    configuration_verdicts,
    format_prediction,
    format_validation,
    format_verdicts,
    load_machine,
    measure,
    predict_with_sensitivity,
    validate_files,
)
from megatron_bdlora.bench.results import write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The subcommand (measure, validate, predict) and its flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="calibrate collectives, bandwidth, matmul rate and LoRA branch cost here")
    m.add_argument("--tp", type=int, default=2, help="gloo ranks of the TP group to sweep (default 2)")
    m.add_argument("--threads", type=int, default=1, help="torch threads per rank, as bench_serving uses (default 1)")
    m.add_argument("--reps", type=int, default=40, help="timed runs per point (median; default 40)")
    v = sub.add_parser("validate", help="predicted vs measured BD / S-LoRA decode-step ratio of a bench_serving JSON, "
                                        "beside two trivial predictors' (constant 1.0; no-adapter step + FLOP share)")
    v.add_argument("--bench", type=Path, required=True, action="append",
                   help="bench_serving.py or bench_sweep.py JSON (repeatable)")
    v.add_argument("--machine", required=True, action="append", help="measure's JSON for each --bench, in order")
    v.add_argument("--statistic", default="decode_step_ms_p10", choices=("decode_step_ms_p10", "decode_step_ms_p50"),
                   help="the measured decode-step time compared (default: p10, robust to other load on the machine)")
    v.add_argument("--latency", choices=("in-loop", "isolated"), default="in-loop",
                   help="collective latency charged: measured inside a compute loop (default) or back to back")
    r = sub.add_parser("predict", help="BD / S-LoRA at the paper's setting on hardware given by published figures")
    r.add_argument("--model", choices=sorted(PAPER), default="llama-3.1-8b", help="model shape (default llama-3.1-8b)")
    r.add_argument("--tp", type=int, default=8, help="TP degree (default 8)")
    r.add_argument("--machine", default="a100-nvlink", help=f"built-in {sorted(PUBLISHED)} or measure's JSON")
    r.add_argument("--lora-rank", type=int, default=16, help="S-LoRA's rank r; BD at 2r, 4r, matched (default 16)")
    r.add_argument("--tokens", default="1,8,32,128", help="decode batch sizes (comma-separated; default 1,8,32,128)")
    for q in (m, v, r):
        q.add_argument("--json", type=Path, help="write the result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the subcommand, print its table, write the JSON; returns what the JSON holds."""
    args = parse_args(argv)
    if args.command == "measure":
        result = measure(args.tp, args.threads, args.reps)
    elif args.command == "validate":
        if len(args.bench) != len(args.machine):
            raise SystemExit(f"give one --machine per --bench ({len(args.bench)} benches, "
                             f"{len(args.machine)} machines)")
        rows = validate_files(args.bench, args.machine, args.statistic, args.latency)
        verdicts = configuration_verdicts(rows)
        print(format_validation(rows) + "\n\n" + format_verdicts(verdicts))
        result = dict(rows=rows, configurations=verdicts)
    else:
        machine = load_machine(args.machine)
        tokens = [int(t) for t in args.tokens.split(",")]
        result = predict_with_sensitivity(args.model, args.tp, machine, tokens, args.lora_rank)
        print(format_prediction(result, args.model, args.tp, machine, args.lora_rank))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
