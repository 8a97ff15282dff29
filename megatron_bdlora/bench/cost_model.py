"""A cost model of one decode step per sharding mode: base + LoRA bytes/FLOPs + the collectives the plan issues
(tools/cost_model.py is its command line; the serving benchmark takes its count of the added collectives).

    python tools/cost_model.py measure --tp 2 --json runs/machine_tp2.json        # calibrate on this machine
    python tools/cost_model.py validate --bench runs/paper_tp2_8b.json --machine runs/machine_tp2.json
    python tools/cost_model.py predict --model llama-3.1-8b --tp 8 --machine a100-nvlink --json runs/predict_8b.json

Per decode step of n tokens, on one TP rank:
    T(mode) = T_base + sum over layers and targets [ c_branch + max(bytes / BW, flops / F) ]
                     + sum over the plan's collectives [ alpha_kind(segment) + message bytes / beta_kind ]
bytes: every token's own adapter's local factor slices (ShardingPlan.local_shape), read k times (BGMV: the torch path
gathers them per token, [n, r, d], and multiplies: k = 3; a fused kernel reads them once: k = 1), plus the branch's
activations; flops: 2 n (A + B local elements per adapter); collectives: one per fused megatron layer whose
plan has one (S-LoRA: all-gather after qkv and gate/up, all-reduce after o and down), message n x local rank
space. BW, F and c_branch (the fixed cost of one projection's shrink + expand: dispatch and launches) and
(alpha, beta) per collective kind are measured here (`measure`: a sweep of all-reduce / all-gather sizes on the
TP group, a copy, a skinny matmul, the LoRA ops at tiny size) or given for hardware we do not have (`predict`
with the published-figure machines below). A collective inside a step also waits for the slowest rank to finish
the compute before it, which back-to-back collectives never do: `measure` times that too (S-LoRA's pattern of
collectives after matmul segments of several lengths, against the same segments without them), and alpha then
is that in-loop cost at the step's segment length (its base step over its 2 base all-reduces per layer).
T_base: `validate` takes the measured no-adapter decode step of the benchmark run; `predict` models it as the
rank's weight bytes over HBM bandwidth plus the base layers' two all-reduces per layer (a lower bound: no
kernel-launch, attention or scheduler time).

`validate` also scores two trivial predictors of the same ratio, so that the model's error has a yardstick: a
constant 1.0 (BD and S-LoRA cost the same) and the measured no-adapter step scaled by 1 + each system's LoRA share
of the step's FLOPs (time follows arithmetic alone). The model is called predictive for a configuration only where
its mean |error| over that configuration's runs is below both of theirs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_bdlora.bench.tables import fixed_width_table
from megatron_bdlora.config import ALL_TARGETS, LoRASettings
from megatron_bdlora.local_ranks import run_distributed
from megatron_bdlora.lora_batch import FactorView, SlotBatch
from megatron_bdlora.ops import lora_expand, lora_shrink
from megatron_bdlora.param_count import BUILTIN_CONFIGS, match_bd_rank
from megatron_bdlora.sharding import Collective
from megatron_bdlora.targets import llama_projections, lora_plan

KINDS = {Collective.ALL_REDUCE: "all_reduce", Collective.ALL_GATHER: "all_gather"}
SWEEP_BYTES = [2**k for k in range(6, 21, 2)]  # 64 B .. 1 MiB: the rank-space messages of decode and prefill
# in-loop collectives: compute segments of n decode-shaped matmuls ([8, 1024] @ [1024, 1024]), ~1-40 ms here;
# longer segments are held at the last point (their rounds spread by more than the collective costs)
SEGMENT_MATMULS = (1, 4, 16, 64)
PAPER = {"llama-3.1-8b": {"2r": 1.63, "4r": 1.30}, "llama-3.1-70b": {"2r": 1.79, "4r": 1.23}}  # BD / S-LoRA, 8xA100


@dataclass(frozen=True)
class Machine:
    """What the model needs to know about the hardware, and where each number comes from."""

    name: str
    source: str
    mem_bandwidth_gbs: float  # streaming reads (factors, weights)
    matmul_gflops: float  # skinny (decode-shaped) matmuls
    branch_overhead_us: float  # fixed cost of one projection's LoRA shrink + expand
    factor_reads_per_token: float  # k: passes over each token's own factors (torch path 3, a fused kernel 1)
    latency_us: dict  # collective kind -> alpha
    bandwidth_gbs: dict  # collective kind -> beta (message bytes / (t - alpha))
    # (compute segment us, us per collective) measured inside a compute loop; empty: use latency_us
    in_loop_latency_us: tuple = ()

    def collective_us(self, kind: str, message_bytes: int, segment_us: float | None = None) -> float:
        """One collective's time; after a compute segment of segment_us, its in-loop latency where measured."""
        alpha = self.latency_us[kind]
        if self.in_loop_latency_us and segment_us is not None:
            points = sorted(self.in_loop_latency_us)
            # piecewise linear in log(segment), held flat beyond the measured range
            alpha = float(np.interp(math.log(max(segment_us, 1e-3)), [math.log(p[0]) for p in points],
                                    [p[1] for p in points]))
        return alpha + message_bytes / (self.bandwidth_gbs[kind] * 1e3)


# Published figures (a stated source each; the latency is the least certain number: see `predict`'s sweep).
PUBLISHED = {
    "a100-nvlink": Machine(
        name="8x A100-SXM4-80GB, NVLink 3 (DGX A100)",
        source="HBM2e 2039 GB/s and 312 dense bf16 TFLOP/s: NVIDIA A100 datasheet; NCCL all-reduce / all-gather of "
               "small messages on 8 NVLink GPUs ~15 us (nccl-tests all_reduce_perf small sizes are 10-25 us on "
               "NVLink systems, e.g. NVIDIA/nccl#583 (8x A100-SXM4), NCCL's own tuning model in NVIDIA/nccl#1453 "
               "(25 us at 64 B, H100)); bus bandwidth ~230 GB/s (nccl-tests busbw on DGX A100); a LoRA projection = "
               "2 kernel launches of ~4 us each (CUDA launch latency, no CUDA graphs)",
        mem_bandwidth_gbs=2039.0,
        matmul_gflops=312e3,
        branch_overhead_us=8.0,
        factor_reads_per_token=1.0,
        latency_us={"all_reduce": 15.0, "all_gather": 15.0},
        bandwidth_gbs={"all_reduce": 230.0, "all_gather": 230.0},
    ),
}


def model_config(model: str, layers: int | None = None) -> dict:
    """The HF config of a built-in model shape (megatron_bdlora.param_count), with `layers` layers when given."""
    config = dict(BUILTIN_CONFIGS[model])
    if layers:
        config["num_hidden_layers"] = layers
    return config


def layer_collectives(hf_config: dict, settings: LoRASettings, tp: int) -> list[tuple[Collective, int]]:
    """(collective, local rank space) of each fused megatron layer of one decoder layer whose plan issues one: the
    adapters of a fused layer (q/k/v, gate/up) share its single collective over their concatenated rank space."""
    out = []
    projections = llama_projections(hf_config)
    for layer_name in dict.fromkeys(p.megatron_layer for p in projections.values()):
        targets = [t for t in settings.targets if projections[t].megatron_layer == layer_name]
        plans = [lora_plan(hf_config, t, settings, tp) for t in targets]
        if not plans or plans[0].collective is Collective.NONE:
            continue
        out.append((plans[0].collective, sum(p.a.local_shape[0] for p in plans)))
    return out


def extra_collectives(hf_config: dict, settings: LoRASettings, tp: int) -> int:
    """Collectives a forward adds over the base model: one per fused megatron layer whose plan has one, every layer."""
    return len(layer_collectives(hf_config, settings, tp)) * hf_config["num_hidden_layers"]


def collectives_per_step(hf_config: dict, settings: LoRASettings, tp: int, tokens: int,
                         elem_bytes: int) -> list[tuple[str, int]]:
    """(kind, message bytes) of every collective the adapters add to one forward over `tokens` tokens."""
    out = []
    for collective, local_rank_space in layer_collectives(hf_config, settings, tp):
        size = tokens * local_rank_space * elem_bytes * (tp if collective is Collective.ALL_GATHER else 1)
        out.append((KINDS[collective], size))
    return out * hf_config["num_hidden_layers"]


def lora_work(hf_config: dict, settings: LoRASettings, tp: int, tokens: int, factor_reads: float,
              elem_bytes: int) -> tuple[float, int, int]:
    """(bytes, flops, branches) of one rank's LoRA branches in one forward of `tokens` tokens, each token reading its
    own adapter's factors `factor_reads` times."""
    per_layer_bytes = per_layer_flops = 0
    for t in settings.targets:
        plan = lora_plan(hf_config, t, settings, tp)
        a, b = plan.a.local_shape, plan.b.local_shape
        factors = a[0] * a[1] + b[0] * b[1]
        activations = tokens * (a[1] * plan.a.local_blocks + b[0])  # x read, output read + written (once)
        per_layer_bytes += elem_bytes * (factor_reads * tokens * factors + 2 * activations)
        per_layer_flops += 2 * tokens * factors
    layers = hf_config["num_hidden_layers"]
    return per_layer_bytes * layers, per_layer_flops * layers, len(settings.targets) * layers


def predict_step(hf_config: dict, settings: LoRASettings | None, tp: int, tokens: int, machine: Machine,
                 base_ms: float, elem_bytes: int) -> dict:
    """Milliseconds of one decode step in a mode (settings None: no adapter), split into its terms."""
    if settings is None:
        return dict(base_ms=base_ms, lora_ms=0.0, collectives_ms=0.0, collectives=0, total_ms=base_ms)
    nbytes, flops, branches = lora_work(hf_config, settings, tp, tokens, machine.factor_reads_per_token, elem_bytes)
    per_branch_us = [machine.branch_overhead_us] * branches
    lora_ms = (sum(per_branch_us) + max(nbytes / (machine.mem_bandwidth_gbs * 1e3),
                                        flops / (machine.matmul_gflops * 1e3))) / 1e3
    colls = collectives_per_step(hf_config, settings, tp, tokens, elem_bytes)
    segment_us = base_ms * 1e3 / (2 * hf_config["num_hidden_layers"])  # compute between two base all-reduces
    coll_ms = sum(machine.collective_us(kind, size, segment_us) for kind, size in colls) / 1e3
    return dict(base_ms=base_ms, lora_ms=lora_ms, collectives_ms=coll_ms, collectives=len(colls),
                total_ms=base_ms + lora_ms + coll_ms)


def modelled_base_ms(hf_config: dict, tp: int, tokens: int, machine: Machine, elem_bytes: int) -> float:
    """Lower bound of a base decode step: the rank's layer weights over memory bandwidth + 2 all-reduces per layer."""
    per_layer = sum(p.d_in * p.d_out for p in llama_projections(hf_config).values())
    layers = hf_config["num_hidden_layers"]
    weights_us = per_layer * layers / tp * elem_bytes / (machine.mem_bandwidth_gbs * 1e3)
    allreduce_us = 2 * layers * machine.collective_us("all_reduce", tokens * hf_config["hidden_size"] * elem_bytes)
    return (weights_us + allreduce_us) / 1e3


def base_flops(hf_config: dict, tp: int, tokens: int) -> float:
    """One rank's FLOPs of a base forward over `tokens` tokens: every decoder-layer weight and the LM head once per
    token (attention over the context is left out: under 5% of a layer at the benchmarks' <= 64-token contexts)."""
    per_layer = sum(p.d_in * p.d_out for p in llama_projections(hf_config).values())
    weights = per_layer * hf_config["num_hidden_layers"] + hf_config["vocab_size"] * hf_config["hidden_size"]
    return 2 * tokens * weights / tp


def flop_share_step_ms(hf_config: dict, settings: LoRASettings, tp: int, tokens: int, base_ms: float) -> float:
    """The trivial "no-adapter step + FLOP share" predictor: the no-adapter step scaled by 1 + the adapters' FLOPs
    over the base's, what a step would cost if its time followed arithmetic alone."""
    lora_flops = lora_work(hf_config, settings, tp, tokens, 1.0, 4)[1]
    return base_ms * (1 + lora_flops / base_flops(hf_config, tp, tokens))


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares t = alpha + bytes / beta over (bytes, us) points; (alpha us, beta GB/s)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)  # us per byte
    slope = max(slope, 1e-9)
    return my - slope * mx, 1.0 / slope / 1e3


# ---------------------------------------------------------------------------------------------------- measure


def _median_us(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def measure_worker(info: Any, threads: int, reps: int) -> dict:
    """On every rank of the TP group: the collective sweep; rank 0 also the local rates."""
    torch.set_num_threads(threads)
    group = dist.group.WORLD
    sweep = {}
    for kind in ("all_reduce", "all_gather"):
        points = []
        for size in SWEEP_BYTES:
            x = torch.ones(size // 4)
            if kind == "all_reduce":
                fn = functools.partial(dist.all_reduce, x, group=group)
            else:
                out = torch.empty(x.numel() * info.tp_size)
                fn = functools.partial(dist.all_gather_into_tensor, out, x, group=group)
            dist.barrier()
            points.append((size * (info.tp_size if kind == "all_gather" else 1), _median_us(fn, reps)))
        sweep[kind] = points
    in_loop = in_loop_latency(info.tp_size, group, reps)
    if info.rank != 0:
        return {}
    return dict(sweep=sweep, in_loop=in_loop, **local_rates(reps))


def in_loop_latency(tp: int, group: Any, reps: int, seconds_per_point: float = 5.0) -> list[tuple[float, float]]:
    """(segment us, extra us per collective) of S-LoRA's collectives after compute segments of each length.

    A decode step alternates compute segments with the base layers' all-reduces. S-LoRA adds an all-gather inside
    a segment (after qkv or gate/up, ~0.6 of it) and an all-reduce just before the base one (after o or down).
    Both patterns run interleaved on every rank; their difference in one round, halved, is what one added
    collective costs once the ranks arrive at it at different times (median over rounds). It is noisy, so each
    point runs at least `reps` rounds and as many as fill `seconds_per_point` (rank 0's estimate, the same count
    on every rank).
    """
    x, w = torch.randn(8, 1024), torch.randn(1024, 1024)
    base, small = torch.zeros(8 * 1024), torch.zeros(8 * 64)  # a base all-reduce; a rank-space intermediate
    gathered = torch.empty(small.numel() * tp)

    def compute(n: int) -> None:
        for _ in range(n):
            torch.matmul(x, w)

    def base_only(n: int) -> None:
        compute(n)
        dist.all_reduce(base, group=group)

    def with_slora(n: int) -> None:
        first = max(1, round(0.6 * n))
        compute(first)
        dist.all_gather_into_tensor(gathered, small, group=group)
        compute(n - first)
        dist.all_reduce(small, group=group)
        dist.all_reduce(base, group=group)

    points = []
    for n in SEGMENT_MATMULS:
        t = time.perf_counter()
        with_slora(n)
        rounds = torch.tensor([max(reps, min(1000, int(seconds_per_point / (3 * (time.perf_counter() - t)))))])
        dist.broadcast(rounds, src=0, group=group)
        times = {"compute": [], "base": [], "slora": []}
        dist.barrier(group=group)
        for _ in range(int(rounds) + 1):  # the first round warms up
            for name, fn in (("compute", compute), ("base", base_only), ("slora", with_slora)):
                t = time.perf_counter()
                fn(n)
                times[name].append((time.perf_counter() - t) * 1e6)
            dist.barrier(group=group)  # (compute alone ran unsynchronised; start the next round together)
        # paired within each round (both patterns ran back to back), so drift of the machine cancels
        extra = statistics.median(s - b for s, b in zip(times["slora"][1:], times["base"][1:])) / 2
        points.append((statistics.median(times["compute"][1:]), extra))
    return points


def local_rates(reps: int) -> dict:
    """Copy bandwidth, skinny-matmul rate and the fixed cost of one LoRA projection branch (torch ops path)."""
    src = torch.randn(2**24)
    dst = torch.empty_like(src)
    copy_us = _median_us(lambda: dst.copy_(src), max(5, reps // 4))
    x, w = torch.randn(8, 4096), torch.randn(4096, 256)
    mm_us = _median_us(lambda: torch.matmul(x, w), reps)
    views = [FactorView(8, 64)] * 4
    a, b = torch.randn(4, 8, 64), torch.randn(4, 64, 8)
    batch = SlotBatch.from_slot_ids(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 4)
    xs, out = torch.randn(8, 64), torch.zeros(8, 64)
    scal = torch.ones(4)
    branch_us = _median_us(lambda: lora_expand(lora_shrink(xs, a, views, batch), b, views, scal, batch, out), reps)
    return dict(mem_bandwidth_gbs=2 * src.numel() * 4 / (copy_us * 1e3),
                matmul_gflops=2 * 8 * 4096 * 256 / (mm_us * 1e3), branch_overhead_us=branch_us)


def measure(tp: int, threads: int, reps: int) -> dict:
    """Calibrate this machine on `tp` local gloo ranks and print what was measured; returns measure's JSON."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    raw = run_distributed(measure_worker, tp, threads, reps)[0]
    fits = {kind: fit_line(points) for kind, points in raw["sweep"].items()}
    machine = Machine(
        name=f"this machine, TP={tp} gloo ranks, {threads} thread(s) each",
        source="measured by tools/cost_model.py measure",
        mem_bandwidth_gbs=raw["mem_bandwidth_gbs"], matmul_gflops=raw["matmul_gflops"],
        branch_overhead_us=raw["branch_overhead_us"],
        factor_reads_per_token=3.0,  # measure runs the torch path: gather each token's factors, then bmm
        latency_us={k: f[0] for k, f in fits.items()}, bandwidth_gbs={k: f[1] for k, f in fits.items()},
        in_loop_latency_us=tuple(tuple(p) for p in raw["in_loop"]),
    )
    print(f"collective sweep at TP={tp} (message bytes: median us)")
    for kind, points in raw["sweep"].items():
        print(f"  {kind:11} " + "  ".join(f"{b}:{t:.0f}" for b, t in points)
              + f"   fit: {fits[kind][0]:.0f} us + bytes / {fits[kind][1]:.2f} GB/s")
    print("  in the loop (compute segment us: us per added collective) "
          + "  ".join(f"{s:.0f}:{t:.0f}" for s, t in machine.in_loop_latency_us))
    print(f"copy {machine.mem_bandwidth_gbs:.1f} GB/s, skinny matmul {machine.matmul_gflops:.1f} GFLOP/s, "
          f"LoRA branch fixed cost {machine.branch_overhead_us:.0f} us")
    return dict(machine=asdict(machine), sweep=raw["sweep"], tp=tp)


# ---------------------------------------------------------------------------------------------------- validate


def _bench_settings(bench: dict) -> dict[str, LoRASettings]:
    """The adapter sets a bench_serving result served: variant -> LoRASettings."""
    out = {}
    for variant, s in bench["config"]["adapter_settings"].items():
        out[variant] = LoRASettings(rank=s["rank"], alpha=s["alpha"], mode=s.get("mode", "block_diagonal"),
                                    nblocks=s["nblocks"])
    return out


TRIVIAL = ("constant", "flop_share")  # the yardsticks `validate` scores beside the model, in table order


def validate(bench: dict, machine: Machine, statistic: str = "decode_step_ms_p10") -> list[dict]:
    """Predicted vs measured decode-step ratio of every BD system against S-LoRA in a bench_serving run, beside the
    trivial predictors' (TRIVIAL) ratios.

    statistic: which decode-step time of each system (per repeat, then the median over repeats) is compared; the
    10th percentile by default, closest to the uncontended cost when other work shares the machine.
    """
    cfg = bench["config"]
    hf_config, tp = cfg["base_hf_config"], cfg["tp"]
    systems, served = bench["systems"], cfg.get("systems_served", {})
    variants = _bench_settings(bench)
    tokens = min(cfg["max_num_seqs"], cfg["num_requests"])
    adapters = min(cfg["num_adapters"], tokens)
    base_ms = systems["none"]["metrics"][statistic]
    elem_bytes = 4  # the CPU benchmark serves float32

    def settings_of(name: str) -> LoRASettings:
        s = variants[served[name]["variant"]] if served else variants["bd"]
        mode = served[name]["mode"] if served else name
        nblocks = s.nblocks if mode == "block_diagonal" else None
        return LoRASettings(rank=s.rank, alpha=s.alpha, mode=mode, nblocks=nblocks)

    slora = predict_step(hf_config, settings_of("slora"), tp, tokens, machine, base_ms, elem_bytes)
    slora_by_flops = flop_share_step_ms(hf_config, settings_of("slora"), tp, tokens, base_ms)
    slora_ms = systems["slora"]["metrics"][statistic]
    rows = []
    for name in systems:
        if not name.startswith(("bd", "block_diagonal")):
            continue
        bd = predict_step(hf_config, settings_of(name), tp, tokens, machine, base_ms, elem_bytes)
        bd_ms = systems[name]["metrics"][statistic]
        measured, predicted = slora_ms / bd_ms, slora["total_ms"] / bd["total_ms"]
        error = predicted / measured - 1
        by_flops = slora_by_flops / flop_share_step_ms(hf_config, settings_of(name), tp, tokens, base_ms)
        trivial = {k: dict(predicted_ratio=v, error=v / measured - 1)
                   for k, v in dict(constant=1.0, flop_share=by_flops).items()}
        # per repeat, both systems ran in the same round (bench_serving interleaves them): the run's own spread
        pairs = zip(systems["slora"]["per_repeat"], systems[name]["per_repeat"])
        rows.append(dict(bd=name, label=systems[name]["label"], configuration=bench["title"], tp=tp, tokens=tokens,
                         adapters=adapters, predicted_ratio=predicted, measured_ratio=measured,
                         measured_ratio_repeats=[s[statistic] / b[statistic] for s, b in pairs], error=error,
                         within_15pct=abs(error) <= 0.15, trivial=trivial,
                         beats_trivial=beats_trivial(abs(error), {k: abs(t["error"]) for k, t in trivial.items()}),
                         bd_terms=bd, slora_terms=slora, statistic=statistic, measured_bd_ms=bd_ms,
                         measured_slora_ms=slora_ms, measured_base_ms=base_ms))
    return rows


def beats_trivial(model_abs_error: float, trivial_abs_errors: dict[str, float]) -> bool:
    """Whether the model's |error| is below every trivial predictor's: only then does it predict more than they do."""
    return all(model_abs_error < e for e in trivial_abs_errors.values())


def configuration_verdicts(rows: list[dict]) -> list[dict]:
    """Per configuration (one benchmark title and BD system, over all its runs): each predictor's mean |error| and
    whether the model is predictive there, i.e. beats both trivial predictors."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["configuration"], row["label"]), []).append(row)
    out = []
    for (configuration, label), runs in groups.items():
        trivial = {k: statistics.fmean(abs(r["trivial"][k]["error"]) for r in runs) for k in TRIVIAL}
        model = statistics.fmean(abs(r["error"]) for r in runs)
        out.append(dict(configuration=configuration, label=label, tp=runs[0]["tp"],
                        runs=[" ".join(filter(None, (r["bench"], r["point"]))) for r in runs],
                        measured_ratios=[r["measured_ratio"] for r in runs],
                        mean_abs_error=dict(model=model, **trivial), predictive=beats_trivial(model, trivial)))
    return out


# ---------------------------------------------------------------------------------------------------- predict


def predict(model: str, tp: int, machine: Machine, tokens_list: list[int], lora_rank: int,
            elem_bytes: int = 2) -> list[dict]:
    """BD (2r, 4r, matched) / S-LoRA (r) decode-step ratios at TP for each decode batch, beside the paper's."""
    hf_config = model_config(model)
    lora = LoRASettings(rank=lora_rank, alpha=2.0 * lora_rank, mode="slora")
    matched = match_bd_rank(hf_config, ALL_TARGETS, tp, lora_rank)
    bd_ranks = {"2r": 2 * lora_rank, "4r": 4 * lora_rank, "matched": matched}
    rows = []
    for tokens in tokens_list:
        base = modelled_base_ms(hf_config, tp, tokens, machine, elem_bytes)
        s = predict_step(hf_config, lora, tp, tokens, machine, base, elem_bytes)
        for label, rank in bd_ranks.items():
            bd = predict_step(hf_config, LoRASettings(rank=rank, alpha=2.0 * rank, nblocks=tp), tp, tokens, machine,
                              base, elem_bytes)
            rows.append(dict(model=model, tp=tp, tokens=tokens, bd=label, bd_rank=rank, lora_rank=lora_rank,
                             predicted_ratio=s["total_ms"] / bd["total_ms"],
                             paper_ratio=PAPER.get(model, {}).get(label),
                             bd_terms=bd, slora_terms=s))
    return rows


def load_machine(value: str) -> Machine:
    """A --machine value: a built-in machine's name or measure's JSON; exits naming the problem otherwise."""
    if value in PUBLISHED:
        return PUBLISHED[value]
    path = Path(value)
    if not path.is_file():
        raise SystemExit(f"--machine {value!r}: neither a built-in machine {sorted(PUBLISHED)} nor a JSON file")
    fields = json.loads(path.read_text()).get("machine", {})
    missing = [f.name for f in dataclass_fields(Machine) if f.name not in fields and f.default is MISSING]
    if missing:
        raise SystemExit(f"--machine {path}: key 'machine' lacks {missing}: not the JSON of this version's "
                         f"`cost_model.py measure` (run it again)")
    return Machine(**fields)


def with_latency(machine: Machine, latency_us: float) -> Machine:
    """The machine with every collective kind's latency set to `latency_us` (the least certain published input)."""
    return Machine(**{**asdict(machine), "latency_us": {k: latency_us for k in machine.latency_us}})


def isolated(machine: Machine) -> Machine:
    """The machine charging collectives their back-to-back latency (its in-loop table dropped)."""
    return Machine(**{**asdict(machine), "in_loop_latency_us": ()})


def _check_bench(result: dict, where: str) -> None:
    """Exit naming the file and key when a result lacks what `validate` compares: S-LoRA, the floor, a title."""
    missing = [k for k in ("slora", "none") if k not in result.get("systems", {})]
    if missing:
        raise SystemExit(f"--bench {where}: key 'systems' lacks {missing}: validate needs S-LoRA and the no-adapter "
                         "floor (bench_serving.py --modes block_diagonal,slora,none or --paper-ranks)")
    if "title" not in result:
        raise SystemExit(f"--bench {where}: no key 'title' (it names the configuration whose runs are grouped): "
                         "not a bench_serving.py or bench_sweep.py JSON")


def validate_files(benches: list[Path], machines: list[str], statistic: str, latency: str) -> list[dict]:
    """`validate` over bench_serving / bench_sweep JSON files, one calibration per file: rows naming file and point."""
    rows = []
    for bench_path, machine in zip(benches, machines):
        data = json.loads(bench_path.read_text())
        # a bench_sweep.py JSON holds one bench_serving result per point of its axis
        if "points" in data:
            points = [(f"{data['axis']}={p['value']}", p["result"]) for p in data["points"]]
        else:
            points = [("", data)]
        calibration = load_machine(machine)
        if latency == "isolated":
            calibration = isolated(calibration)
        for point, result in points:
            _check_bench(result, " ".join(filter(None, (str(bench_path), point))))
            rows += [dict(r, bench=bench_path.name, point=point) for r in validate(result, calibration, statistic)]
    return rows


def _pct(error: float) -> str:
    return f"{100 * error:+.1f}%"


def format_validation(rows: list[dict]) -> str:
    """Measured vs predicted S-LoRA / BD decode-step ratio, one line per BD system and point, beside the trivial
    predictors' (constant 1.0; no-adapter step + FLOP share) and whether the model beats both."""
    head = ("bench", "point", "TP", "BD system", "measured", "repeats", "model", "error", "1.0 error", "FLOP share",
            "error", "beats both")
    body = [(r["bench"], r["point"], str(r["tp"]), r["label"], f"{r['measured_ratio']:.3f}",
             f"{min(r['measured_ratio_repeats']):.2f}-{max(r['measured_ratio_repeats']):.2f}",
             f"{r['predicted_ratio']:.3f}", _pct(r["error"]), _pct(r["trivial"]["constant"]["error"]),
             f"{r['trivial']['flop_share']['predicted_ratio']:.3f}", _pct(r["trivial"]["flop_share"]["error"]),
             "yes" if r["beats_trivial"] else "no") for r in rows]
    return ("S-LoRA / BD decode step (> 1: BD faster); error = predicted / measured - 1; trivial predictors: 1.0 "
            "(constant), FLOP share (no-adapter step x (1 + LoRA FLOPs / base FLOPs) per system)\n"
            + fixed_width_table(head, body))


def format_verdicts(verdicts: list[dict]) -> str:
    """One line per configuration: its runs' measured ratios, each predictor's mean |error|, the verdict."""
    head = ("runs", "TP", "BD system", "measured per run", "model |err|", "1.0 |err|", "FLOP share |err|",
            "predictive")
    body = [(", ".join(v["runs"]), str(v["tp"]), v["label"], " / ".join(f"{m:.3f}" for m in v["measured_ratios"]),
             *(f"{100 * v['mean_abs_error'][k]:.1f}%" for k in ("model", *TRIVIAL)),
             "yes" if v["predictive"] else "no") for v in verdicts]
    won = sum(v["predictive"] for v in verdicts)
    return (fixed_width_table(head, body) + f"\npredictive (mean |error| below both trivial predictors') on {won} of "
            f"{len(verdicts)} configurations")


SENSITIVITY_LATENCIES_US = (8.0, 15.0, 30.0)  # `predict`'s sweep of the small-message collective latency


def predict_with_sensitivity(model: str, tp: int, machine: Machine, tokens: list[int], lora_rank: int) -> dict:
    """`predict`, and the same at each latency of SENSITIVITY_LATENCIES_US: predict's JSON."""
    rows = predict(model, tp, machine, tokens, lora_rank)
    sensitivity = {lat: predict(model, tp, with_latency(machine, lat), tokens, lora_rank)
                   for lat in SENSITIVITY_LATENCIES_US}
    return dict(machine=asdict(machine), rows=rows,
                latency_sensitivity={str(k): [r["predicted_ratio"] for r in v] for k, v in sensitivity.items()})


def format_prediction(result: dict, model: str, tp: int, machine: Machine, lora_rank: int) -> str:
    """The predicted ratios per decode batch and BD rank, at each sensitivity latency, beside the paper's."""
    lines = [f"{model} TP={tp} on {machine.name}: BD / S-LoRA (r={lora_rank}) decode step, predicted",
             f"{'tokens':>6} {'BD':8} {'rank':>4} {'predicted':>9} {'at 8/15/30 us':>16} {'paper':>6}"]
    sensitivity = result["latency_sensitivity"]
    for i, row in enumerate(result["rows"]):
        sens = "/".join(f"{ratios[i]:.2f}" for ratios in sensitivity.values())
        paper = f"{row['paper_ratio']:.2f}" if row["paper_ratio"] else "-"
        lines.append(f"{row['tokens']:>6} {row['bd']:8} {row['bd_rank']:>4} {row['predicted_ratio']:9.2f} "
                     f"{sens:>16} {paper:>6}")
    return "\n".join(lines)
