"""Serve one seeded multi-adapter workload through our serving loop in each LoRA sharding mode and compare.

    python tools/bench_serving.py --tp 2 --modes block_diagonal,slora,replicated,none \\
        --json runs/bench_serving.json --plot runs/bench_serving.png
    python tools/bench_serving.py --tp 1 --peft --json runs/bench_serving_tp1.json --plot runs/bench_serving_tp1.png
    python tools/bench_serving.py --tp 2 --model-shape llama-3.1-8b --layers 2 --paper-ranks --json runs/paper_tp2.json

One workload (prompts as token ids, an adapter per request drawn from a power-law popularity as in S-LoRA's
benchmark, arrival times, output lengths; all from --seed) is replayed in-process, without HTTP, through
`ServingLoop` (megatron-core's dynamic engine with adapter slots): at TP 1 in this process, at TP > 1 on
spawned gloo ranks where rank 0 submits by the arrival schedule against wall time and every rank steps in
lockstep. K random BD adapters (nblocks = TP) are written as native checkpoints; the slora and replicated
loops serve the same adapters converted exactly, so their greedy outputs must equal BD's (checked). Mode
"none" sends every request to the base model (same loop, no adapter): the floor. --peft (TP 1) also runs
the prompts through transformers + PEFT mixed-adapter batching (`generate(..., adapter_names=[...])`) in
static batches of --max-num-seqs requests, and compares its greedy outputs with ours.

--model-shape gives the random base the per-layer widths of Llama-3.1-8B / 70B (d, ffn, query and KV heads;
SmolLM2's vocabulary of 49152, not 128256) with --layers layers. --paper-ranks compares as the paper does, at
ranks instead of exact conversions: plain LoRA adapters of rank r (--adapter-rank) in S-LoRA and replicated mode
(the same adapters: their greedy outputs must be equal) against BD adapters (nblocks = TP) of rank 2r, 4r and
the rank with LoRA's parameter count at this TP (megatron_bdlora.param_count.match_bd_rank, as tools/rank_match.py).

Per system: output tokens/s (generated tokens / wall time from the first arrival to the last token), time to
first token, time per output token after the first, the median decode-only step (robust to bursts of load
from other processes), request latency, engine steps, and the collectives of one decode-only engine step
(counted in the untimed warm-up). Ratios are BD's against each other system, measured in the same run
(systems interleaved, in rotating order, when --repeats > 1; the tables show medians over repeats). Timings
come from rank 0's time.perf_counter.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import textwrap
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from megatron_bdlora.atomic import atomic_write_text
from megatron_bdlora.bench.workload import B_STD, PeftBatcher, compare_tokens
from megatron_bdlora.bench.workload import percentile as _percentile
from megatron_bdlora.bench.workload import write_random_adapter as _write_adapter

# known-harmless noise from every rank (CPU build without Transformer Engine; megatron's older c10d names)
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

# spawned ranks import the worker from this file by module name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("block_diagonal", "slora", "replicated")  # the adapter modes of the sharding plan, in table order
NONE = "none"  # every request to the base model, on the block_diagonal loop
PEFT = "peft"  # transformers + PEFT mixed-adapter batching (TP 1)
LABELS = {"block_diagonal": "BD", "slora": "S-LoRA", "replicated": "replicated", NONE: "none", PEFT: "PEFT"}
BD_PAPER_RANKS = ("bd_2r", "bd_4r", "bd_matched")  # --paper-ranks: BD systems (and their adapter variants)
FIRST_TOKEN_ID = 100  # prompt ids are drawn above the tokenizer's special tokens
_SHORT = {"all_reduce": "AR", "all_gather_into_tensor": "AG", "all_gather": "AG", "reduce_scatter_tensor": "RS",
          "reduce_scatter": "RS", "broadcast": "BC"}
# (name in the ratio table, other system, target of BD tok/s / other tok/s at TP 1, at TP >= 2) from the serving issue
TARGETS = (
    ("BD vs S-LoRA", "slora", None, 1.3),
    ("BD vs replicated", "replicated", None, 1.0),
    ("BD vs none", NONE, 0.9, 0.9),
    ("BD vs PEFT", PEFT, 1.3, None),
)


# ---------------------------------------------------------------------------------------------------- workload


def make_workload(args: argparse.Namespace, vocab_size: int) -> list[dict]:
    """The seeded requests: arrival time (s), prompt ids, adapter index, output length; sorted by arrival."""
    rng = random.Random(args.seed)
    weights = [1.0 / (k + 1) ** args.popularity_alpha for k in range(args.num_adapters)]  # Zipf popularity
    arrival = 0.0
    out = []
    for i in range(args.num_requests):
        if args.arrival == "poisson" and i > 0:
            arrival += rng.expovariate(args.rate)
        prompt = [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(rng.randint(*args.prompt_len))]
        out.append(dict(
            arrival_s=arrival,
            prompt_ids=prompt,
            adapter=rng.choices(range(args.num_adapters), weights)[0],
            output_len=rng.randint(*args.output_len),
        ))
    return out


def random_llama_config(args: argparse.Namespace) -> dict:
    """HF LlamaConfig fields of the random base model (vocabulary and tokenizer: SmolLM2's)."""
    return dict(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_hidden_layers=args.layers,
        max_position_embeddings=max(2048, args.max_model_len),
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def prepare_base(args: argparse.Namespace) -> tuple[Path, Path]:
    """(HF directory, megatron checkpoint at --tp) of the base model, from the project cache."""
    from megatron_bdlora.base_models import EMBEDDED, ensure_megatron_base, resolve_hf_base

    if args.model == "smollm2":
        hf_dir = resolve_hf_base(EMBEDDED)
    else:
        hf_dir = resolve_hf_base(EMBEDDED, random_config=random_llama_config(args), seed=args.seed)
    return hf_dir, ensure_megatron_base(hf_dir, args.tp)


def adapter_variants(args: argparse.Namespace, hf_config: dict) -> dict:
    """The adapter sets of the run (all seven projections, alpha 2 x rank): variant -> LoRASettings.

    Default: "bd", BD at --adapter-rank with nblocks = TP, served by every mode through exact conversion.
    --paper-ranks: "lora" (plain LoRA at r) and BD at 2r, 4r and LoRA's parameter count at this TP.
    """
    from megatron_bdlora.config import ALL_TARGETS, LoRASettings
    from megatron_bdlora.param_count import match_bd_rank

    r, tp = args.adapter_rank, args.tp
    if not args.paper_ranks:
        return {"bd": LoRASettings(rank=r, alpha=2.0 * r, nblocks=tp)}
    ranks = dict(zip(BD_PAPER_RANKS, (2 * r, 4 * r, match_bd_rank(hf_config, ALL_TARGETS, tp, r))))
    bd = {name: ranks[name] for name in args.bd_ranks}
    return {"lora": LoRASettings(rank=r, alpha=2.0 * r, mode="replicated")} | {
        name: LoRASettings(rank=rank, alpha=2.0 * rank, nblocks=tp) for name, rank in bd.items()}


def system_specs(args: argparse.Namespace, variants: dict) -> dict[str, dict]:
    """Each system of the run, in table order: its label, the loop mode serving it (None: PEFT) and the adapter
    variant its requests use (None: the base model)."""
    out: dict[str, dict] = {}
    for m in args.modes:
        if m == NONE:
            continue
        if not args.paper_ranks:
            out[m] = dict(label=LABELS[m], mode=m, variant="bd")
        elif m == "block_diagonal":
            for v in args.bd_ranks:
                out[v] = dict(label=f"BD {v[3:]} (r={variants[v].rank})", mode=m, variant=v)
        else:
            out[m] = dict(label=f"{LABELS[m]} (r={variants['lora'].rank})", mode=m, variant="lora")
    if NONE in args.modes:
        out[NONE] = dict(label=LABELS[NONE], mode="block_diagonal", variant=None)
    if args.peft:
        out[PEFT] = dict(label=LABELS[PEFT], mode=None, variant="bd")
    return out


def adapter_names(variants: dict, num_adapters: int) -> dict[str, list[str]]:
    """variant -> the names of its K adapters (a0, a1, ... when there is one variant)."""
    prefix = (lambda v: "") if len(variants) == 1 else (lambda v: f"{v}-")  # noqa: E731
    return {v: [f"{prefix(v)}a{k}" for k in range(num_adapters)] for v in variants}


def write_adapters(root: Path, hf_config: dict, args: argparse.Namespace, variants: dict) -> dict[str, str]:
    """K native checkpoints per variant with random non-zero factors (A unit gain, B std B_STD); name -> directory."""
    out = {}
    for (variant, settings), names in zip(variants.items(), adapter_names(variants, args.num_adapters).values()):
        for k, name in enumerate(names):
            out[name] = _write_adapter(root / name, hf_config, settings, args.tp, args.seed * 1000 + k)
    return out


def expected_extra_collectives(hf_config: dict, mode: str, tp: int, rank: int) -> int:
    """Collectives a forward adds over the base model in `mode`: one per fused megatron layer whose plan has one."""
    from megatron_bdlora.config import ALL_TARGETS, LoRASettings
    from megatron_bdlora.sharding import Collective
    from megatron_bdlora.targets import llama_projections, lora_plan

    settings = LoRASettings(rank=rank, mode=mode, nblocks=tp if mode == "block_diagonal" else None)
    projections = llama_projections(hf_config)
    layers = {projections[p].megatron_layer for p in ALL_TARGETS
              if lora_plan(hf_config, p, settings, tp).collective is not Collective.NONE}
    return len(layers) * hf_config["num_hidden_layers"]


# ---------------------------------------------------------------------------------------------------- our loop


class _StepProbe:
    """Forward pre-hook on the served model: counts engine forwards and remembers whether the last one decoded only."""

    def __init__(self, loop: Any) -> None:
        self.ctx = loop.engine.context
        self.forwards = 0
        self.decode_forwards = 0
        self.last_decode_only: bool | None = None
        loop.model.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        self.forwards += 1
        self.last_decode_only = bool(self.ctx.is_decode_only())
        self.decode_forwards += self.last_decode_only


def _all_done(done: bool, tp: int) -> bool:
    """Every rank stops after the same step: rank 0's verdict (followers pass True), all-reduced."""
    if tp == 1:
        return done
    flag = torch.tensor([int(done)])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def replay(loop: Any, probe: _StepProbe, info: Any, workload: list[dict], adapters: list[str | None],
           count: bool = False, bar: Any = None) -> dict | None:
    """Run the workload through the loop (rank 0 submits at the arrival times; every rank steps in lockstep).

    adapters[i]: the adapter of request i (None: the base model). Rank 0 returns per-request times (s from the
    start), tokens, engine steps and, with `count`, the collectives of the first decode-only step.
    """
    from megatron_bdlora.inference.requests import GenerationParams

    forwards0, decode0 = probe.forwards, probe.decode_forwards
    loop.count_collectives = count
    decode_collectives = None
    if info.rank != 0:
        while True:
            loop.step()
            if _all_done(True, info.tp_size):
                break
        loop.count_collectives = False
        return None
    n = len(workload)
    recs = [dict(arrival=r["arrival_s"], first=None, finish=None, tokens=[]) for r in workload]
    queues: dict[int, Any] = {}
    decode_step_s: list[float] = []  # wall time of each decode-only loop step
    submitted = finished = 0
    t0 = time.perf_counter()
    while True:
        now = time.perf_counter() - t0
        while submitted < n and workload[submitted]["arrival_s"] <= now:  # the workload is sorted by arrival
            r = workload[submitted]
            params = GenerationParams(max_tokens=r["output_len"], temperature=0.0, ignore_eos=True)
            queues[submitted] = loop.submit(r["prompt_ids"], adapters[submitted], params)[1]
            submitted += 1
        if finished == submitted < n:  # idle until the next arrival (the followers wait in the step's broadcast)
            time.sleep(max(0.0, workload[submitted]["arrival_s"] - now))
            continue
        probe.last_decode_only = None
        before = time.perf_counter()
        loop.step()
        t = time.perf_counter() - t0
        if probe.last_decode_only:
            decode_step_s.append(t0 + t - before)
        if count and decode_collectives is None and probe.last_decode_only:
            decode_collectives = dict(loop.step_collectives)
        for i in list(queues):
            q = queues[i]
            while not q.empty():
                ev = q.get()
                if ev.token_ids and recs[i]["first"] is None:
                    recs[i]["first"] = t
                recs[i]["tokens"] += ev.token_ids
                if ev.finished:
                    if ev.finish_reason != "length":
                        raise RuntimeError(f"request {i} finished with {ev.finish_reason}: {ev.error}")
                    recs[i]["finish"] = t
                    del queues[i]
                    finished += 1
                    if bar is not None:
                        bar.update(1)
                    break
        if _all_done(finished == n, info.tp_size):
            break
    loop.count_collectives = False
    return dict(requests=recs, engine_steps=probe.forwards - forwards0,
                decode_steps=probe.decode_forwards - decode0, decode_collectives=decode_collectives,
                decode_step_s=decode_step_s)


# PEFT's peer (PeftBatcher) is megatron_bdlora.bench.workload's, shared with the prepared GPU check.


# ---------------------------------------------------------------------------------------------------- worker


def warmup_requests(workload: list[dict], count: int) -> list[dict]:
    """The first `count` requests plus the first request of every adapter not among them (so that every adapter is
    in its slot before timing), all at t=0 with at most 6 new tokens."""
    chosen = list(workload[:count])
    for r in workload[count:]:
        if r["adapter"] not in {c["adapter"] for c in chosen}:
            chosen.append(r)
    return [dict(r, arrival_s=0.0, output_len=min(r["output_len"], 6)) for r in chosen]


def serve_worker(info: Any, spec: dict, workload: list[dict], adapter_dirs: dict[str, str]) -> dict | None:
    """On one TP rank: build a loop per mode, warm each system up, replay the workload --repeats times."""
    from tqdm import tqdm

    from megatron_bdlora.inference.engine import ServingConfig, ServingLoop

    torch.set_num_threads(spec["threads"])
    specs, names = spec["systems"], spec["names"]
    systems = list(specs)
    loops, probes = {}, {}
    for mode in dict.fromkeys(s["mode"] for s in specs.values() if s["mode"]):
        # every adapter its systems serve stays resident in its own slot: no adapter loads while timing
        variants = list(dict.fromkeys(s["variant"] for s in specs.values() if s["mode"] == mode and s["variant"]))
        served = {n: adapter_dirs[n] for v in variants for n in names[v]}
        config = ServingConfig(megatron_dir=Path(spec["megatron_dir"]), mode=mode, adapters=served,
                               max_loras=spec["max_loras"] * max(1, len(variants)),
                               max_lora_rank=max([spec["ranks"][v] for v in variants], default=spec["adapter_rank"]),
                               **spec["engine"])
        loops[mode] = ServingLoop.create(config, info)
        probes[mode] = _StepProbe(loops[mode])
    peft = PeftBatcher(Path(spec["hf_dir"]), spec["peft_dirs"], spec["engine"]["max_num_seqs"]) if PEFT in systems else None

    def run(system: str, requests: list[dict], count: bool = False, bar: Any = None) -> dict | None:
        s = specs[system]
        adapters = [names[s["variant"]][r["adapter"]] if s["variant"] else None for r in requests]
        if system == PEFT:
            return peft.replay(requests, adapters, bar)
        return replay(loops[s["mode"]], probes[s["mode"]], info, requests, adapters, count, bar)

    lead = info.rank == 0
    warm = warmup_requests(workload, spec["warmup"])
    out: dict[str, dict] = {s: dict(repeats=[]) for s in systems}
    for s in systems:  # first-step costs, and the collectives of a decode-only step (untimed)
        result = run(s, warm, count=True)
        if lead:
            out[s]["decode_collectives"] = result["decode_collectives"]
    total = spec["repeats"] * len(systems) * len(workload)
    with tqdm(total=total, desc="serving", unit="req", disable=None if lead else True, file=sys.stderr) as bar:
        for rep in range(spec["repeats"]):
            order = systems[rep % len(systems):] + systems[: rep % len(systems)]  # rotate: drift hits all alike
            for s in order:
                bar.set_postfix_str(s)
                result = run(s, workload, bar=bar)
                if lead:
                    out[s]["repeats"].append(result)
    if spec.get("profile"):  # one more untimed replay per system under torch.profiler: where a step's time goes
        for s in systems:
            if s == PEFT:
                continue
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                result = run(s, workload)
            if lead:
                out[s]["profile"] = profile_summary(prof, result["engine_steps"])
    return out if lead else None


def profile_summary(prof: Any, engine_steps: int, top: int = 12) -> dict:
    """Rank 0's top ops by self CPU time over one profiled replay: ms per engine step and share of the total."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    return dict(
        engine_steps=engine_steps,
        self_cpu_ms_per_step=total_ms / engine_steps,
        ops=[dict(name=e.key, calls_per_step=e.count / engine_steps, ms_per_step=e.self_cpu_time_total / 1e3 / engine_steps,
                  share=e.self_cpu_time_total / 1e3 / total_ms) for e in events[:top]],
    )


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
                            [(o["name"][:48], f"{o['calls_per_step']:.1f}", f"{o['ms_per_step']:.1f}", f"{100 * o['share']:.1f}%")
                             for o in prof["ops"]]))
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- summary


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
        ttft_ms_p50=1e3 * _percentile(ttft, 50),
        tpot_ms_mean=1e3 * statistics.fmean(tpot) if tpot else float("nan"),
        latency_s_p50=_percentile(latency, 50),
        latency_s_p99=_percentile(latency, 99),
        engine_steps=run["engine_steps"],
        decode_steps=run["decode_steps"],
        # robust to bursts of load from other processes: the median decode-only step of the replay
        decode_step_ms_p50=1e3 * _percentile(run["decode_step_s"], 50) if run["decode_step_s"] else float("nan"),
        # near the uncontended cost on a shared machine: load from other processes only ever adds time
        decode_step_ms_p10=1e3 * _percentile(run["decode_step_s"], 10) if run["decode_step_s"] else float("nan"),
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
    pairs = [(g[0], other) for g in groups.values() for other in g[1:]] + [(ref, n) for n in specs if not specs[n]["variant"]]
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
                comparison=label if bd_name == "block_diagonal" else f"{systems[bd_name]['label']} vs {systems[other]['label']}",
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


def collectives_label(counts: dict | None) -> str:
    """'34 (32AR+2AG)': total, then the kinds; '0' when none; '-' when not counted."""
    if counts is None:
        return "-"
    total = sum(counts.values())
    if not total:
        return "0"
    parts = [f"{n if n > 1 else ''}{_SHORT.get(op, op)}" for op, n in sorted(counts.items())]
    return f"{total} ({'+'.join(parts)})"


def fixed_width_table(head: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    """Left-aligned first column, right-aligned numbers; pastes into Markdown as a code block."""
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(b) for b in body])


def format_systems(rows: list[dict]) -> str:
    """Fixed-width table of the systems (medians over repeats); pastes into Markdown as a code block."""
    head = ("system", "tokens", "wall s", "tok/s", "TTFT ms", "TTFT p50", "TPOT ms", "step p50 ms", "lat p50 s",
            "lat p99 s", "steps", "coll/decode step")
    body = []
    for r in rows:
        m = r["metrics"]
        body.append((
            r["label"], f"{m['output_tokens']:g}", f"{m['wall_s']:.2f}", f"{m['tokens_per_s']:.1f}",
            f"{m['ttft_ms_mean']:.0f}", f"{m['ttft_ms_p50']:.0f}", f"{m['tpot_ms_mean']:.1f}",
            f"{m['decode_step_ms_p50']:.1f}", f"{m['latency_s_p50']:.2f}", f"{m['latency_s_p99']:.2f}", f"{m['engine_steps']:g}",
            collectives_label(r["decode_collectives"]),
        ))
    return fixed_width_table(head, body)


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


def plot(path: Path, rows: list[dict], title: str) -> None:
    """Bars per system: tokens/s, time per output token, request latency p50 / p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _code_version() -> dict:
    """The commit of the megatron_bdlora package that ran, and its tracked files changed since (numbers depend on them)."""
    import subprocess

    import megatron_bdlora

    repo = Path(megatron_bdlora.__file__).resolve().parents[1]

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    changed = git("status", "--porcelain", "--untracked-files=no")
    return dict(repo=str(repo), commit=git("rev-parse", "HEAD"),
                modified_files=None if changed is None else [ln[3:] for ln in changed.splitlines()])


def _environment(threads: int) -> dict:
    from importlib.metadata import version  # not the packages themselves: importing peft alone takes seconds

    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu_model)
    except OSError:
        pass
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        megatron_core=version("megatron-core"),
        transformers=version("transformers"),
        peft=version("peft"),
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_model=cpu_model,
        host_cpu_count=os.cpu_count(),
        usable_cpu_count=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        torch_threads_per_rank=threads,
        device="cpu",
        backend="gloo",
        code=_code_version(),
    )


# ---------------------------------------------------------------------------------------------------- CLI


def _pair(text: str) -> tuple[int, int]:
    """'MIN,MAX' (or one number) -> (MIN, MAX)."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Replay one seeded multi-adapter workload through our serving loop in BD, S-LoRA and replicated "
        "mode (and with no adapter, and optionally transformers + PEFT) and compare throughput, latency, "
        "collectives and greedy outputs (CPU, local gloo ranks).",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree = local gloo ranks (1: this process); also BD's nblocks (default 1)")
    p.add_argument("--modes", default=",".join(MODES + (NONE,)),
                   help="comma-separated systems of our loop: block_diagonal, slora, replicated, none (none: every "
                   "request to the base model, the floor) (default: all four)")
    p.add_argument("--peft", action="store_true", help="also run transformers + PEFT mixed-adapter batching on the same prompts (TP 1 only)")
    p.add_argument("--json", type=Path, default=None, help="write workload, machine, per-system metrics, ratios and output checks to this JSON file")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG with bars of tokens/s and latency per system")
    w = p.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=8, help="requests in the workload (default 8)")
    w.add_argument("--num-adapters", type=int, default=4, help="K random BD adapters the requests are spread over (default 4)")
    w.add_argument("--adapter-rank", type=int, default=16, help="rank r of every adapter; a multiple of --tp (default 16)")
    w.add_argument("--paper-ranks", action="store_true",
                   help="the paper's comparison: plain LoRA at r in S-LoRA / replicated vs BD at 2r, 4r and LoRA's "
                        "parameter count (rank-match at this TP), instead of one BD adapter set converted exactly")
    w.add_argument("--bd-ranks", default=",".join(r[3:] for r in BD_PAPER_RANKS),
                   help="with --paper-ranks: which BD systems to run, comma-separated from 2r, 4r, matched (default: all "
                        "three; fewer make a sweep cheaper)")
    w.add_argument("--popularity-alpha", type=float, default=1.0,
                   help="power-law (Zipf) popularity of the adapters as in S-LoRA's benchmark: adapter k is drawn with "
                   "weight 1/(k+1)^alpha; 0 = uniform (default 1.0)")
    w.add_argument("--arrival", choices=("poisson", "all"), default="all",
                   help="'all': every request arrives at t=0; 'poisson': exponential gaps at --rate (default all)")
    w.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second with --arrival poisson (default 4)")
    w.add_argument("--prompt-len", type=_pair, default=(24, 40), metavar="MIN,MAX", help="prompt tokens, uniform in [MIN, MAX] (default 24,40)")
    w.add_argument("--output-len", type=_pair, default=(64, 64), metavar="MIN,MAX", help="generated tokens per request, uniform in [MIN, MAX] (default 64,64)")
    w.add_argument("--seed", type=int, default=0, help="seed of the workload, the adapters and the random base model (default 0)")
    m = p.add_argument_group("base model")
    m.add_argument("--model", choices=("smollm2", "random"), default=None,
                   help="smollm2: the embedded SmolLM2-135M-Instruct (float32; 3 KV heads, so TP 1 or 3); random: a "
                   "seeded random Llama of the shape below with SmolLM2's tokenizer (default: smollm2 at TP 1, random otherwise)")
    m.add_argument("--model-shape", choices=("llama-3.1-8b", "llama-3.1-70b"), default=None,
                   help="random Llama with this model's per-layer widths (d, ffn, heads, KV heads; SmolLM2's vocabulary) "
                        "and --layers layers; overrides --hidden/--intermediate/--heads/--kv-heads")
    m.add_argument("--layers", type=int, default=None, help="random Llama: decoder layers (default 16; 2 with --model-shape)")
    m.add_argument("--hidden", type=int, default=512, help="random Llama: hidden size (default 512)")
    m.add_argument("--intermediate", type=int, default=1536, help="random Llama: MLP width (default 1536)")
    m.add_argument("--heads", type=int, default=8, help="random Llama: attention heads (default 8)")
    m.add_argument("--kv-heads", type=int, default=4, help="random Llama: KV heads, divisible by --tp (default 4)")
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=8, help="requests decoded concurrently (ours), batch size (PEFT) (default 8)")
    e.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step (prompt chunks + decodes); a multiple of 64 (default 512)")
    e.add_argument("--max-loras", type=int, default=None, help="adapter slots of our loop (default: --num-adapters, all resident)")
    e.add_argument("--max-model-len", type=int, default=None, help="context length of the loop (default: longest prompt + output)")
    e.add_argument("--kv-cache-gb", type=float, default=0.5, help="paged KV cache per rank, GB (default 0.5)")
    e.add_argument("--block-size", type=int, default=64, help="KV cache block size in tokens (default 64)")
    r = p.add_argument_group("measurement")
    r.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: usable CPUs / TP, at least 1)")
    r.add_argument("--warmup", type=int, default=2, help="requests of the workload (plus the first request of every adapter not among them; at most 6 new tokens each) run untimed through each system first; their decode-only step gives the collective counts (default 2)")
    r.add_argument("--timeout-s", type=float, default=4 * 3600.0, help="give up on the ranks after this long (default 4 h)")
    r.add_argument("--repeats", type=int, default=1, help="timed replays per system, interleaved across systems; the table shows medians (default 1)")
    r.add_argument("--profile", action="store_true",
                   help="after the timed replays, one more per system under torch.profiler (CPU): its top ops by self "
                        "time per engine step on rank 0, printed and in the JSON (where a step's time goes)")
    args = p.parse_args(argv)
    if args.model_shape:
        from megatron_bdlora.param_count import BUILTIN_CONFIGS

        shape = BUILTIN_CONFIGS[args.model_shape]
        args.model = "random"
        args.hidden, args.intermediate = shape["hidden_size"], shape["intermediate_size"]
        args.heads, args.kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
        args.layers = args.layers or 2
    args.layers = args.layers or 16
    args.modes = [s.strip() for s in args.modes.split(",") if s.strip()]
    unknown = [s for s in args.modes if s not in MODES + (NONE,)]
    if unknown or not args.modes or len(set(args.modes)) != len(args.modes):
        p.error(f"--modes must be distinct names from {list(MODES + (NONE,))}, got {args.modes}")
    args.bd_ranks = [f"bd_{s.strip()}" for s in args.bd_ranks.split(",") if s.strip()]
    if not args.bd_ranks or len(set(args.bd_ranks)) != len(args.bd_ranks) or set(args.bd_ranks) - set(BD_PAPER_RANKS):
        p.error(f"--bd-ranks must be distinct names from {[r[3:] for r in BD_PAPER_RANKS]}, got {[r[3:] for r in args.bd_ranks]}")
    for flag in ("tp", "num_requests", "num_adapters", "adapter_rank", "layers", "hidden", "intermediate", "heads",
                 "kv_heads", "max_num_seqs", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the collectives are counted on the warm-up's decode steps)")
    if args.peft and args.tp != 1:
        p.error("--peft runs at --tp 1 only (transformers + PEFT is a single-process baseline)")
    if args.peft and args.paper_ranks:
        p.error("--peft compares the exactly converted adapters: it does not combine with --paper-ranks")
    if args.adapter_rank % args.tp:
        p.error(f"--adapter-rank {args.adapter_rank} must be a multiple of --tp {args.tp} (BD blocks the rank over TP)")
    if args.rate <= 0:
        p.error(f"--rate must be > 0, got {args.rate}")
    args.model = args.model or ("smollm2" if args.tp == 1 else "random")
    if args.model == "random" and (args.kv_heads % args.tp or args.heads % args.kv_heads or args.hidden % args.heads):
        p.error(f"random Llama: --kv-heads {args.kv_heads} must divide by --tp {args.tp}, --heads {args.heads} by "
                f"--kv-heads and --hidden {args.hidden} by --heads")
    if args.model == "smollm2" and 3 % args.tp:
        p.error(f"SmolLM2-135M has 3 KV heads: it cannot run at --tp {args.tp}; use --model random")
    args.max_loras = args.max_loras or args.num_adapters
    need = args.prompt_len[1] + args.output_len[1]
    args.max_model_len = args.max_model_len or need
    if args.max_model_len < need:
        p.error(f"--max-model-len {args.max_model_len} < longest prompt + output ({need})")
    args.threads = args.threads or max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) // args.tp)
    args.warmup = min(args.warmup, args.num_requests)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the tables, write JSON and PNG; returns what the JSON holds."""
    args = parse_args(argv)
    # this benchmark measures the CPU/gloo path: keep every rank off any GPU (init_parallel picks nccl with CUDA)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import bench_serving  # the worker by module name, so spawned ranks can unpickle it

    from megatron_bdlora.checkpoint.peft import export_peft_directory
    from megatron_bdlora.local_ranks import free_port, run_distributed

    environment = _environment(args.threads)  # before the run: the code that runs is the code recorded
    hf_dir, meg_dir = prepare_base(args)
    hf_config = json.loads((meg_dir / "config.json").read_text())
    workload = make_workload(args, hf_config["vocab_size"])
    variants = adapter_variants(args, hf_config)
    specs = system_specs(args, variants)
    names = adapter_names(variants, args.num_adapters)
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
        adapter_dirs = write_adapters(Path(tmp) / "native", hf_config, args, variants)
        peft_dirs = {n: str(export_peft_directory(adapter_dirs[n], Path(tmp) / "peft" / n)) for n in names["bd"]} if args.peft else {}
        spec = dict(
            systems=specs, names=names, ranks={v: st.rank for v, st in variants.items()},
            threads=args.threads, warmup=args.warmup, repeats=args.repeats, profile=args.profile,
            megatron_dir=str(meg_dir), hf_dir=str(hf_dir), peft_dirs=peft_dirs, adapter_rank=args.adapter_rank,
            max_loras=args.max_loras,
            engine=dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb, block_size=args.block_size,
                        seed=args.seed),
        )
        if args.tp == 1:  # in this process, with --threads threads
            from megatron_bdlora.parallel import destroy_parallel, init_parallel

            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            info = init_parallel(tp_size=1)
            try:
                raw = bench_serving.serve_worker(info, spec, workload, adapter_dirs)
            finally:
                destroy_parallel()
        else:
            raw = run_distributed(bench_serving.serve_worker, args.tp, spec, workload, adapter_dirs, timeout=args.timeout_s)[0]

    rows = {s: summarise_system(s, specs[s]["label"], raw[s]) for s in specs}
    check = agreement(rows, specs)
    ratio_rows = ratios(rows, specs, args.tp, args.max_num_seqs)
    extra = {m: expected_extra_collectives(hf_config, m, args.tp, args.adapter_rank) for m in MODES}
    counts = Counter(r["adapter"] for r in workload)
    model_text = ("SmolLM2-135M" if args.model == "smollm2" else
                  f"random Llama {args.layers}L h{args.hidden} ffn{args.intermediate} {args.heads}H/{args.kv_heads}KV"
                  + (f" ({args.model_shape} widths, vocab {hf_config['vocab_size']})" if args.model_shape else ""))
    adapters_text = (f"{args.num_adapters} BD adapters rank {args.adapter_rank}" if not args.paper_ranks else
                     f"{args.num_adapters} adapters per system: " + ", ".join(
                         f"{v} r={st.rank}" for v, st in variants.items()))
    title = (f"TP={args.tp}, {model_text}, float32, {args.threads} thread(s)/rank; {args.num_requests} requests "
             f"({args.arrival}{f' {args.rate}/s' if args.arrival == 'poisson' else ''}) over {adapters_text} "
             f"(requests per adapter {[counts[k] for k in range(args.num_adapters)]}), "
             f"prompt {args.prompt_len[0]}-{args.prompt_len[1]}, output {args.output_len[0]}-{args.output_len[1]}, "
             f"max-num-seqs {args.max_num_seqs}; median of {args.repeats} repeat(s)")
    print(title)
    print(format_systems(list(rows.values())))
    print()
    print(format_ratios(ratio_rows))
    print()
    print(format_agreement(check, {s: row["label"] for s, row in rows.items()}))
    print("expected extra collectives per forward over the base: " + ", ".join(f"{LABELS[m]} {n}" for m, n in extra.items()))
    if args.profile:
        print()
        print(format_profiles(rows))

    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    cfg.update(json=str(args.json) if args.json else None, plot=str(args.plot) if args.plot else None,
               megatron_dir=str(meg_dir), hf_dir=str(hf_dir), base_hf_config=hf_config,
               adapter_settings={v: dict(mode=st.mode.value, rank=st.rank, alpha=st.alpha, nblocks=st.nblocks,
                                         targets="all seven projections", b_std=B_STD) for v, st in variants.items()},
               systems_served={n: dict(s) for n, s in specs.items()},
               timing="rank 0 time.perf_counter from the first arrival; per system: warm-up, then --repeats timed "
                      "replays interleaved across systems; table values are medians over repeats",
               none="every request to the base model on the block_diagonal loop (adapter slots unused)",
               peft_batching="static batches of --max-num-seqs in arrival order, left-padded; a request's finish is "
                             "the step of its own last token")
    result = dict(
        config=cfg,
        environment=environment,
        workload=dict(requests=workload, requests_per_adapter={f"a{k}": counts[k] for k in range(args.num_adapters)}),
        systems=rows,
        ratios=ratio_rows,
        agreement=check,
        expected_extra_collectives_per_forward=extra,
        title=title,
    )
    if args.plot:
        plot(args.plot, list(rows.values()), title)
        print(f"wrote {args.plot}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
