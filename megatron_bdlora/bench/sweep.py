"""How the BD-LoRA / S-LoRA / replicated comparison moves along one axis: the serving benchmark
(megatron_bdlora.bench.serving) run once per value, with the cost model's prediction beside each point
(tools/bench_sweep.py is its command line)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from megatron_bdlora.bench import serving
from megatron_bdlora.bench.cost_model import Machine, load_machine, validate
from megatron_bdlora.bench.plots import pyplot, save_figure
from megatron_bdlora.bench.results import write_json
from megatron_bdlora.bench.tables import fixed_width_table

AXES = {  # axis -> the bench_serving flags one value sets
    "batch": ("--max-num-seqs", "--num-requests"),
    "adapters": ("--num-adapters",),
    "layers": ("--layers",),
}
AXIS_LABELS = {"batch": "decode batch (requests per step)", "adapters": "adapters", "layers": "decoder layers"}
OTHERS = ("slora", "replicated", "none")  # what each BD system is compared with, in table order


def point_rows(value: int, result: dict, machine: Machine | None, statistic: str) -> list[dict]:
    """One row per BD system of one point: step times of every system and BD's ratios against each other."""
    systems = result["systems"]
    predicted = {}
    if machine is not None:
        predicted = {r["bd"]: r["predicted_ratio"] for r in validate(result, machine, statistic)}
    rows = []
    for bd in (n for n in systems if n.startswith("bd_")):
        m = systems[bd]["metrics"]
        row = dict(value=value, bd=bd, label=systems[bd]["label"],
                   step_ms={n: systems[n]["metrics"][statistic] for n in systems})
        for other in OTHERS:
            o = systems[other]["metrics"]
            row[f"tokens_per_s_vs_{other}"] = m["tokens_per_s"] / o["tokens_per_s"]
            row[f"step_vs_{other}"] = o[statistic] / m[statistic]
            # per repeat, both systems ran in the same round (bench_serving interleaves them): drift cancels
            pairs = zip(systems[other]["per_repeat"], systems[bd]["per_repeat"])
            row[f"paired_step_vs_{other}"] = statistics.median(a[statistic] / b[statistic] for a, b in pairs)
        row["predicted_step_vs_slora"] = predicted.get(bd)
        row["collectives_per_decode_step"] = {n: sum((systems[n]["decode_collectives"] or {}).values())
                                              for n in systems}
        row["outputs_identical_slora_replicated"] = result["agreement"].get("adapter_modes_identical")
        rows.append(row)
    return rows


def format_table(axis: str, rows: list[dict]) -> str:
    """One line per point and BD system: step times of every system, BD's ratios and the cost model's prediction."""
    head = (axis, "BD system", "none ms", "BD ms", "S-LoRA ms", "repl ms", "vs S-LoRA: tok/s", "step", "step paired",
            "predicted", "vs repl: tok/s", "step paired", "vs none: tok/s", "step paired")
    body = [(
        str(r["value"]), r["label"], *(f"{r['step_ms'][n]:.1f}" for n in ("none", r["bd"], "slora", "replicated")),
        f"{r['tokens_per_s_vs_slora']:.3f}", f"{r['step_vs_slora']:.3f}", f"{r['paired_step_vs_slora']:.3f}",
        "-" if r["predicted_step_vs_slora"] is None else f"{r['predicted_step_vs_slora']:.3f}",
        f"{r['tokens_per_s_vs_replicated']:.3f}", f"{r['paired_step_vs_replicated']:.3f}",
        f"{r['tokens_per_s_vs_none']:.3f}", f"{r['paired_step_vs_none']:.3f}",
    ) for r in rows]
    return fixed_width_table(head, body)


def plot(path: Path, axis: str, rows: list[dict], title: str) -> None:
    """Each system's decode step over BD's (paired per repeat; > 1: BD faster) against the axis, and the cost
    model's S-LoRA / BD prediction."""
    plt = pyplot()
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
    ax.set_xlabel(AXIS_LABELS[axis])
    ax.set_ylabel("other system's step / BD's (> 1: BD faster)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def run_sweep(args: argparse.Namespace) -> dict:
    """Run the serving benchmark at every value of the axis (bench_serving's flags in args.bench), print the table,
    write JSON (after every point) and PNG; returns what the JSON holds."""
    machine = None
    if args.machine:
        measured_tp = json.loads(args.machine.read_text()).get("tp")
        bench_tp = serving.parse_args(args.bench).tp
        if measured_tp != bench_tp:
            raise SystemExit(f"--machine {args.machine} was measured at TP={measured_tp}, "
                             f"the bench runs at --tp {bench_tp}")
        machine = load_machine(str(args.machine))
    out = dict(axis=args.axis_name, values=args.values, bench_args=args.bench, statistic=args.statistic,
               machine=str(args.machine) if args.machine else None, rows=[], points=[])
    for value in args.values:
        flags = [x for flag in AXES[args.axis_name] for x in (flag, str(value))]
        print(f"\n=== {args.axis_name}={value}: bench_serving {' '.join(args.bench + flags)}", flush=True)
        start = time.perf_counter()
        result = serving.run(serving.parse_args(args.bench + flags))
        out["points"].append(dict(value=value, seconds=time.perf_counter() - start, result=result))
        out["rows"] += point_rows(value, result, machine, args.statistic)
        if args.json:
            write_json(args.json, out)
    first = out["points"][0]["result"]["config"]
    out["title"] = (f"TP={first['tp']}, {args.axis_name} swept {args.values}; bench_serving {' '.join(args.bench)}; "
                    f"step = {args.statistic}")
    print(f"\n{out['title']}")
    print(format_table(args.axis_name, out["rows"]))
    if args.plot:
        plot(args.plot, args.axis_name, out["rows"], out["title"])
        print(f"wrote {args.plot}")
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return out
