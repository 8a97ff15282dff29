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
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_serving  # noqa: E402
import cost_model  # noqa: E402

from megatron_bdlora.atomic import atomic_write_text  # noqa: E402

AXES = {  # axis -> the bench_serving flags one value sets
    "batch": ("--max-num-seqs", "--num-requests"),
    "adapters": ("--num-adapters",),
    "layers": ("--layers",),
}
OTHERS = ("slora", "replicated", "none")  # what each BD system is compared with, in table order


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


def point_rows(value: int, result: dict, machine: cost_model.Machine | None, statistic: str) -> list[dict]:
    """One row per BD system of one point: step times of every system and BD's ratios against each other."""
    systems = result["systems"]
    predicted = {}
    if machine is not None:
        predicted = {r["bd"]: r["predicted_ratio"] for r in cost_model.validate(result, machine, statistic)}
    rows = []
    for bd in (n for n in systems if n.startswith("bd_")):
        m = systems[bd]["metrics"]
        row = dict(value=value, bd=bd, label=systems[bd]["label"], step_ms={n: systems[n]["metrics"][statistic] for n in systems})
        for other in OTHERS:
            o = systems[other]["metrics"]
            row[f"tokens_per_s_vs_{other}"] = m["tokens_per_s"] / o["tokens_per_s"]
            row[f"step_vs_{other}"] = o[statistic] / m[statistic]
            # per repeat, both systems ran in the same round (bench_serving interleaves them): drift cancels
            pairs = zip(systems[other]["per_repeat"], systems[bd]["per_repeat"])
            row[f"paired_step_vs_{other}"] = statistics.median(a[statistic] / b[statistic] for a, b in pairs)
        row["predicted_step_vs_slora"] = predicted.get(bd)
        row["collectives_per_decode_step"] = {n: sum((systems[n]["decode_collectives"] or {}).values()) for n in systems}
        row["outputs_identical_slora_replicated"] = result["agreement"].get("adapter_modes_identical")
        rows.append(row)
    return rows


def format_table(axis: str, rows: list[dict]) -> str:
    head = (axis, "BD system", "none ms", "BD ms", "S-LoRA ms", "repl ms", "vs S-LoRA: tok/s", "step", "step paired",
            "predicted", "vs repl: tok/s", "step paired", "vs none: tok/s", "step paired")
    body = [(
        str(r["value"]), r["label"], *(f"{r['step_ms'][n]:.1f}" for n in ("none", r["bd"], "slora", "replicated")),
        f"{r['tokens_per_s_vs_slora']:.3f}", f"{r['step_vs_slora']:.3f}", f"{r['paired_step_vs_slora']:.3f}",
        "-" if r["predicted_step_vs_slora"] is None else f"{r['predicted_step_vs_slora']:.3f}",
        f"{r['tokens_per_s_vs_replicated']:.3f}", f"{r['paired_step_vs_replicated']:.3f}",
        f"{r['tokens_per_s_vs_none']:.3f}", f"{r['paired_step_vs_none']:.3f}",
    ) for r in rows]
    return bench_serving.fixed_width_table(head, body)


def plot(path: Path, axis: str, rows: list[dict], title: str) -> None:
    """Each system's decode step over BD's (paired per repeat; > 1: BD faster) against the axis, and the cost
    model's S-LoRA / BD prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for bd in dict.fromkeys(r["bd"] for r in rows):
        mine = [r for r in rows if r["bd"] == bd]
        x = [r["value"] for r in mine]
        label = mine[0]["label"]
        ax.plot(x, [r["paired_step_vs_slora"] for r in mine], "o-", label=f"S-LoRA / {label}, decode step")
        if all(r["predicted_step_vs_slora"] is not None for r in mine):
            ax.plot(x, [r["predicted_step_vs_slora"] for r in mine], "o--", label=f"S-LoRA / {label}, cost model")
        ax.plot(x, [r["paired_step_vs_replicated"] for r in mine], "s-", label=f"replicated / {label}, decode step")
        ax.plot(x, [r["paired_step_vs_none"] for r in mine], "^-", label=f"no adapter / {label}, decode step")
    ax.axhline(1.0, color="grey", lw=0.8)
    if axis == "batch":
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["value"] for r in rows}), [str(v) for v in sorted({r["value"] for r in rows})])
    ax.set_xlabel({"batch": "decode batch (requests per step)", "adapters": "adapters", "layers": "decoder layers"}[axis])
    ax.set_ylabel("other system's step / BD's (> 1: BD faster)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = None
    if args.machine:
        measured_tp = json.loads(args.machine.read_text()).get("tp")
        bench_tp = bench_serving.parse_args(args.bench).tp
        if measured_tp != bench_tp:
            raise SystemExit(f"--machine {args.machine} was measured at TP={measured_tp}, the bench runs at --tp {bench_tp}")
        machine = cost_model._load_machine(str(args.machine))
    out = dict(axis=args.axis_name, values=args.values, bench_args=args.bench, statistic=args.statistic,
               machine=str(args.machine) if args.machine else None, rows=[], points=[])
    for value in args.values:
        flags = [x for flag in AXES[args.axis_name] for x in (flag, str(value))]
        print(f"\n=== {args.axis_name}={value}: bench_serving {' '.join(args.bench + flags)}", flush=True)
        start = time.perf_counter()
        result = bench_serving.main(args.bench + flags)
        out["points"].append(dict(value=value, seconds=time.perf_counter() - start, result=result))
        out["rows"] += point_rows(value, result, machine, args.statistic)
        if args.json:
            atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    first = out["points"][0]["result"]["config"]
    out["title"] = (f"TP={first['tp']}, {args.axis_name} swept {args.values}; bench_serving {' '.join(args.bench)}; "
                    f"step = {args.statistic}")
    print(f"\n{out['title']}")
    print(format_table(args.axis_name, out["rows"]))
    if args.plot:
        plot(args.plot, args.axis_name, out["rows"], out["title"])
        print(f"wrote {args.plot}")
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
