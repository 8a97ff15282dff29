"""The CPU serving benchmark's results: per-system metrics over repeats, output agreement between systems, BD's
ratios against the others (with the serving issue's targets), the tables, the plot and the environment record."""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path
from typing import Any

import torch

from megatron_bdlora.bench.cost_model import extra_collectives
from megatron_bdlora.bench.environment import code_version, machine, package_versions, repo_root, usable_cpu_count
from megatron_bdlora.bench.plots import pyplot, save_figure
from megatron_bdlora.bench.serving_setup import NONE, PEFT
from megatron_bdlora.bench.tables import collectives_label, fixed_width_table
from megatron_bdlora.bench.workload import compare_tokens, percentile
from megatron_bdlora.config import LoRASettings
from megatron_bdlora.frozen_linear import onednn_enabled

# (name in the ratio table, other system, target of BD tok/s / other tok/s at TP 1, at TP >= 2) from issue 23
TARGETS = (
    ("BD vs S-LoRA", "slora", None, 1.5),
    ("BD vs replicated", "replicated", None, 1.0),
    ("BD vs none", NONE, 0.9, 0.9),
    ("BD vs PEFT", PEFT, 1.5, None),
)


def expected_extra_collectives(hf_config: dict, mode: str, tp: int, rank: int) -> int:
    """Collectives a forward adds over the base model in `mode` (the cost model's count), to read the tables by."""
    settings = LoRASettings(rank=rank, mode=mode, nblocks=tp if mode == "block_diagonal" else None)
    return extra_collectives(hf_config, settings, tp)


def run_metrics(run: dict) -> dict:
    """Throughput and latency of one replay from its per-request times (seconds from the first arrival)."""
    recs = run["requests"]
    tokens = sum(len(r["tokens"]) for r in recs)
    wall = max(r["finish"] for r in recs)
    ttft = [r["first"] - r["arrival"] for r in recs]
    tpot = [(r["finish"] - r["first"]) / (len(r["tokens"]) - 1) for r in recs if len(r["tokens"]) > 1]
    latency = [r["finish"] - r["arrival"] for r in recs]
    return dict(
        output_tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall,
        ttft_ms_mean=1e3 * statistics.fmean(ttft),
        ttft_ms_p50=1e3 * percentile(ttft, 50),
        tpot_ms_mean=1e3 * statistics.fmean(tpot) if tpot else float("nan"),
        latency_s_p50=percentile(latency, 50),
        latency_s_p99=percentile(latency, 99),
        engine_steps=run["engine_steps"],
        decode_steps=run["decode_steps"],
        # robust to bursts of load from other processes: the median decode-only step of the replay
        decode_step_ms_p50=1e3 * percentile(run["decode_step_s"], 50) if run["decode_step_s"] else float("nan"),
        # near the uncontended cost on a shared machine: load from other processes only ever adds time
        decode_step_ms_p10=1e3 * percentile(run["decode_step_s"], 10) if run["decode_step_s"] else float("nan"),
    )


def adapter_reads(repeats: list[dict]) -> dict | None:
    """Adapter reads of our loop in the replays (rank 0): reads and loop steps in which a request waited for one
    (medians over repeats, and each repeat's), read latency over all repeats' reads (a later repeat may find every
    adapter it needs cached). None for a system that reads none itself (PEFT keeps every adapter in memory)."""
    if "adapter_read_s" not in repeats[0]:
        return None
    reads_s = [t for r in repeats for t in r["adapter_read_s"]]
    per_repeat = dict(reads=[len(r["adapter_read_s"]) for r in repeats],
                      steps_waiting=[r["steps_waiting_for_adapter"] for r in repeats])
    return {k: statistics.median(v) for k, v in per_repeat.items()} | dict(
        read_ms_p50=1e3 * percentile(reads_s, 50) if reads_s else None,
        read_ms_max=1e3 * max(reads_s) if reads_s else None,
        per_repeat=per_repeat,
    )


def summarise_system(name: str, label: str, result: dict) -> dict:
    """Per-repeat metrics and their medians (the table's numbers); tokens of the first repeat."""
    per_repeat = [run_metrics(r) for r in result["repeats"]]
    keys = [k for k, v in per_repeat[0].items() if v is not None]
    median = {k: statistics.median(m[k] for m in per_repeat) for k in keys}
    first = [r["tokens"] for r in result["repeats"][0]["requests"]]
    stable = all([r["tokens"] for r in rep["requests"]] == first for rep in result["repeats"])
    return dict(
        system=name,
        label=label,
        metrics=median | {k: None for k in per_repeat[0] if k not in keys},
        tokens_per_s_repeats=[m["tokens_per_s"] for m in per_repeat],
        per_repeat=per_repeat,
        decode_collectives=result.get("decode_collectives"),
        outputs_same_every_repeat=stable,
        adapter_reads=adapter_reads(result["repeats"]),
        tokens=first,
        profile=result.get("profile"),
    )


def agreement(systems: dict[str, dict], specs: dict[str, dict]) -> dict:
    """Output checks: systems serving the same adapters in different modes must be identical (mode_mismatches);
    PEFT is compared honestly; none against the first adapter system shows the adapters act."""
    groups: dict[str, list[str]] = {}
    for name, s in specs.items():
        if s["variant"]:
            groups.setdefault(s["variant"], []).append(name)
    ref = next((g[0] for g in groups.values()), None)
    out: dict[str, Any] = {"reference": ref}
    if ref is None:
        return out
    pairs = [(g[0], other) for g in groups.values() for other in g[1:]]
    pairs += [(ref, n) for n in specs if not specs[n]["variant"]]
    for a, b in pairs:
        out[f"{a}_vs_{b}"] = compare_tokens(systems[a]["tokens"], systems[b]["tokens"])
    modes = [f"{a}_vs_{b}" for a, b in pairs if PEFT not in (a, b) and specs[b]["variant"]]
    out["adapter_modes_identical"] = all(out[k]["mismatches"] == 0 for k in modes)
    out["mode_mismatches"] = sum(out[k]["mismatches"] for k in modes)
    out["outputs_same_every_repeat"] = all(row["outputs_same_every_repeat"] for row in systems.values())
    return out


def ratios(systems: dict[str, dict], specs: dict[str, dict], tp: int, max_num_seqs: int) -> list[dict]:
    """Each BD system against each other system (> 1: BD better), with the serving issue's target where one applies."""
    rows = []
    for bd_name in (n for n, s in specs.items() if s["mode"] == "block_diagonal" and s["variant"]):
        bd = systems[bd_name]["metrics"]
        for label, other, target_tp1, target_tp2 in TARGETS:
            if other not in systems:
                continue
            o = systems[other]["metrics"]
            target = target_tp1 if tp == 1 else target_tp2
            if other == "slora" and max_num_seqs > 8:
                target = None  # the S-LoRA target is for batches <= 8
            tps = bd["tokens_per_s"] / o["tokens_per_s"]
            rows.append(dict(
                comparison=(label if bd_name == "block_diagonal"
                            else f"{systems[bd_name]['label']} vs {systems[other]['label']}"),
                bd=bd_name,
                other=other,
                tokens_per_s_ratio=tps,
                tpot_ratio=o["tpot_ms_mean"] / bd["tpot_ms_mean"],
                decode_step_ratio=o["decode_step_ms_p50"] / bd["decode_step_ms_p50"],
                ttft_ratio=o["ttft_ms_mean"] / bd["ttft_ms_mean"],
                latency_p50_ratio=o["latency_s_p50"] / bd["latency_s_p50"],
                target_tokens_per_s_ratio=target,
                met=None if target is None else tps >= target,
            ))
    return rows


def format_systems(rows: list[dict]) -> str:
    """Fixed-width table of the systems (medians over repeats); pastes into Markdown as a code block."""
    head = ("system", "tokens", "wall s", "tok/s", "TTFT ms", "TTFT p50", "TPOT ms", "step p50 ms", "lat p50 s",
            "lat p99 s", "steps", "reads", "read p50 ms", "read max ms", "waited steps", "coll/decode step")
    body = []
    for r in rows:
        m = r["metrics"]
        body.append((
            r["label"], f"{m['output_tokens']:g}", f"{m['wall_s']:.2f}", f"{m['tokens_per_s']:.1f}",
            f"{m['ttft_ms_mean']:.0f}", f"{m['ttft_ms_p50']:.0f}", f"{m['tpot_ms_mean']:.1f}",
            f"{m['decode_step_ms_p50']:.1f}", f"{m['latency_s_p50']:.2f}", f"{m['latency_s_p99']:.2f}",
            f"{m['engine_steps']:g}", *_reads_cells(r["adapter_reads"]),
            collectives_label(r["decode_collectives"]),
        ))
    return fixed_width_table(head, body)


def _reads_cells(reads: dict | None) -> tuple[str, ...]:
    """The table's adapter-read columns ('-' for a system that reads no adapter itself)."""
    if reads is None:
        return ("-",) * 4
    latency = ("-", "-")
    if reads["read_ms_p50"] is not None:
        latency = (f"{reads['read_ms_p50']:.1f}", f"{reads['read_ms_max']:.1f}")
    return (f"{reads['reads']:g}", *latency, f"{reads['steps_waiting']:g}")


def format_ratios(rows: list[dict]) -> str:
    """BD ÷ other for tok/s, other ÷ BD for times: > 1 means BD is better; target and verdict where one applies."""
    head = ("comparison", "tok/s x", "TPOT x", "step p50 x", "TTFT x", "lat p50 x", "target tok/s x", "met")
    body = [(
        r["comparison"], f"{r['tokens_per_s_ratio']:.3f}", f"{r['tpot_ratio']:.3f}", f"{r['decode_step_ratio']:.3f}",
        f"{r['ttft_ratio']:.3f}",
        f"{r['latency_p50_ratio']:.3f}",
        "-" if r["target_tokens_per_s_ratio"] is None else f">= {r['target_tokens_per_s_ratio']}",
        "-" if r["met"] is None else ("yes" if r["met"] else "NO"),
    ) for r in rows]
    return fixed_width_table(head, body)


def format_agreement(check: dict, labels: dict[str, str]) -> str:
    """One line per comparison of greedy outputs."""
    lines = []
    for key, c in check.items():
        if not isinstance(c, dict):
            continue
        a, b = key.split("_vs_", 1)
        diverged = sorted(p for p in c["first_divergence"] if p is not None)
        lines.append(
            f"{labels[a]} vs {labels[b]}: {c['exact_match_requests']}/{c['requests']} requests identical, "
            f"{c['mismatches']} differ; {100 * c['tokens_before_first_divergence']:.1f}% of tokens before the first "
            f"divergence" + (f"; first divergence at tokens {diverged}" if diverged else "")
        )
    if "mode_mismatches" in check:
        lines.append(f"sharding modes identical: {'yes' if check['adapter_modes_identical'] else 'NO'} "
                     f"({check['mode_mismatches']} mismatching requests)")
    return "\n".join(lines)


def format_profiles(rows: dict[str, dict]) -> str:
    """Per system: its top ops (rank 0, self CPU time per engine step over the profiled replay)."""
    lines = []
    for row in rows.values():
        prof = row.get("profile")
        if not prof:
            continue
        lines.append(f"{row['label']}: {prof['self_cpu_ms_per_step']:.1f} ms self CPU per engine step "
                     f"({prof['engine_steps']} steps, rank 0, under torch.profiler)")
        lines.append(fixed_width_table(("op", "calls/step", "ms/step", "share"),
                                       [(o["name"][:48], f"{o['calls_per_step']:.1f}", f"{o['ms_per_step']:.1f}",
                                         f"{100 * o['share']:.1f}%") for o in prof["ops"]]))
        lines.append("")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict], title: str) -> None:
    """Bars per system: tokens/s, time per output token, request latency p50 / p99."""
    plt = pyplot()
    labels = [r["label"] for r in rows]
    m = [r["metrics"] for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    bars = axes[0].bar(x, [v["tokens_per_s"] for v in m], color="tab:blue")
    axes[0].bar_label(bars, fmt="%.1f", fontsize=8)
    axes[0].set_title("output tokens/s (higher is better)")
    bars = axes[1].bar(x, [v["tpot_ms_mean"] for v in m], color="tab:orange")
    axes[1].bar_label(bars, fmt="%.0f", fontsize=8)
    axes[1].set_title("time per output token, ms")
    width = 0.4
    axes[2].bar([i - width / 2 for i in x], [v["latency_s_p50"] for v in m], width, label="p50")
    axes[2].bar([i + width / 2 for i in x], [v["latency_s_p99"] for v in m], width, label="p99")
    axes[2].set_title("request latency, s")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(list(x), labels, rotation=25, ha="right", fontsize=8)  # long --paper-ranks labels
    fig.suptitle("\n".join(textwrap.wrap(title, 140)), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def environment(threads: int) -> dict:
    """The run's machine, versions and code, under the keys of the benchmark's JSON (CPU, gloo)."""
    host = machine()
    versions = package_versions(("megatron-core", "transformers", "peft"))  # metadata: importing peft takes seconds
    return dict(
        date=host["date"],
        torch=torch.__version__,
        megatron_core=versions["megatron-core"],
        transformers=versions["transformers"],
        peft=versions["peft"],
        python=host["python"],
        platform=host["platform"],
        cpu_model=host["cpu_model"],
        host_cpu_count=host["cpu_count"],
        usable_cpu_count=usable_cpu_count(),
        torch_threads_per_rank=threads,
        onednn_base_matmuls=onednn_enabled(),  # frozen_linear: our engine's base weights through oneDNN, packed
        device="cpu",
        backend="gloo",
        code=dict(repo=str(repo_root()), **code_version()),
    )
