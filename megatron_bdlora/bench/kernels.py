"""The multi-adapter LoRA kernels (Triton) against the torch path: correctness first, then speed on a GPU.

Used by tools/bench_kernels.py (the full sweep, printed) and by the GPU check (`gpu_check_part`, one budgeted
part with Markdown tables).

1. Checks: on fresh random inputs, for every sharding mode and layer kind, a mixed batch (uneven segments,
   several ranks and block counts, tokens without an adapter) through ops.lora_shrink + lora_expand on the
   Triton and the torch backends; max error relative to the output's scale, per dtype (fp32, fp16, and bf16 on
   a GPU). On CPU the shapes are scaled down and Triton runs in its interpreter.
2. Timing (GPU only): one LoRA branch on one TP rank (shrink then expand, the plan's collective excluded) at
   the per-rank shapes of Llama-3.1-8B and 70B at TP=8 (q, gate: column; o, down: row), each mode. Decode:
   1-256 tokens spread over 1-64 adapters, ranks 8-128; prefill: 512-8192 tokens. CUDA events, median of
   reps; the Triton path replayed from a CUDA graph (its launch metadata is graph-safe), the torch path run
   eagerly (it syncs once per step to plan its per-slot loop). Achieved GB/s counts the bytes that must move
   (the active adapters' factors, x, the rank space, the output read and written) against the copy bandwidth
   measured in the same run.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

# Without a GPU the kernels can only run in Triton's interpreter. Triton reads TRITON_INTERPRET when the kernels'
# @triton.jit decorators run, i.e. when megatron_bdlora.kernels is first imported (ops imports it lazily, on the
# first Triton call), so the default must be in the environment before then: here, at import of this module,
# before anything below can reach the kernels. An explicit TRITON_INTERPRET in the environment wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron_bdlora.bench.report import PartResult
from megatron_bdlora.lora_batch import FactorView, OutputLayout, SlotBatch, SlotViews
from megatron_bdlora.ops import lora_expand, lora_shrink, use_backend
from megatron_bdlora.sharding import ShardingPlan

MODES = ("block_diagonal", "slora", "replicated")
MODEL_SHAPES = {  # hidden, ffn, query heads, KV heads, head dim (the models' config.json)
    "llama-3.1-8b": (4096, 14336, 32, 8, 128),
    "llama-3.1-70b": (8192, 28672, 64, 8, 128),
}
TP = 8
# max |triton - torch| / max |torch|: fp32 accumulates in fp32 on both paths; fp16 / bf16 round z and the output
# (unit roundoff 2**-11 / 2**-8), the two paths in different places, so two roundings' worth
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DECODE = [(t, a) for t in (1, 16, 64, 256) for a in (1, 8, 64) if a <= t]  # (tokens, adapters)
DECODE_RANKS = (8, 32, 128)
PREFILL = [(t, a) for t in (512, 2048, 8192) for a in (1, 8)]
PREFILL_RANKS = (16,)
INTERPRETER_SCALE = 64  # the checks' layer widths are divided by this in Triton's interpreter (it is ~1e4x slower)
# The GPU check's timing table shows these (phase, tokens, adapters, rank) per model / layer / dtype (BD mode):
# one request decoding, a full decode batch over many adapters, a prefill chunk. They are timed first, in every
# mode, so a short budget still covers every model, layer, phase and dtype.
REPRESENTATIVE = (("decode", 1, 1, 32), ("decode", 256, 64, 32), ("prefill", 2048, 8, 16))
GPU_CHECK_TIMING_DTYPES = (torch.float16, torch.bfloat16)


def layer_shapes(model: str) -> list[tuple[str, str, int, int]]:
    """(name, kind, d_in, d_out) of the full layers whose TP=8 shards are timed."""
    hidden, ffn, heads, _, head_dim = MODEL_SHAPES[model]
    return [
        ("q_proj", "column", hidden, heads * head_dim),
        ("gate_proj", "column", hidden, ffn),
        ("o_proj", "row", heads * head_dim, hidden),
        ("down_proj", "row", ffn, hidden),
    ]


def check_dtypes(gpu: bool) -> list[torch.dtype]:
    """fp32 and fp16 everywhere; bf16 on a GPU only (the interpreter's bf16 dot is wrong, not the kernel)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if gpu else [])


class Case:
    """One rank's LoRA branch for a batch: factor stacks, slot views, inputs, output and its layout."""

    def __init__(self, kind, mode, d_in, d_out, ranks, slot_ids, tp, dtype, device, seed):
        gen = torch.Generator(device).manual_seed(seed)  # drawn on the device: a sweep builds ~500 cases
        rand = functools.partial(torch.randn, generator=gen, device=device)
        plans = [ShardingPlan.build(kind, mode, d_in, d_out, r, tp, nb) for r, nb in ranks]
        cap = max(plans, key=lambda p: p.rank)
        self.views_a = SlotViews(FactorView(*p.a.local_shape, p.a.local_blocks) for p in plans)
        self.views_b = SlotViews(FactorView(*p.b.local_shape, p.b.local_blocks) for p in plans)
        ra, rb = cap.a.local_shape, cap.b.local_shape
        ra = (ra[0], max(v.cols for v in self.views_a))
        rb = (rb[0], max(v.cols for v in self.views_b))
        self.a = self._stack(self.views_a, ra, rand, dtype)
        self.b = self._stack(self.views_b, rb, rand, dtype)
        self.scalings = torch.rand(len(plans), generator=gen, device=device) + 0.5
        n = len(slot_ids)
        d_in_local = d_in if kind == "column" else d_in // tp
        self.x = rand(n, d_in_local).to(dtype)
        self.in_chunks = tp if (kind, mode) == ("column", "slora") else 1
        self.z_full = (rand(n, self.in_chunks * ra[0]) * 0.1).to(dtype)
        rows_b = rb[0]
        if cap.output_is_slice:  # row S-LoRA: rank 0's slice of the full output
            self.out = rand(n, d_out).to(dtype)
            self.layout = OutputLayout(rows_b, rows_b, 0)
        else:
            self.out = rand(n, rows_b).to(dtype)
            self.layout = OutputLayout.contiguous(rows_b)
        self.batch = SlotBatch.from_slot_ids(torch.tensor(slot_ids, device=device), len(plans))
        self.slot_ids = slot_ids

    @staticmethod
    def _stack(views, shape, rand, dtype):
        stack = rand(len(views), *shape) * 0  # zeros beyond each view (a dense stack when all views are full)
        for s, v in enumerate(views):
            stack[s, : v.rows, : v.cols] = rand(v.rows, v.cols) / v.cols**0.5
        return stack.to(dtype)

    def shrink(self) -> torch.Tensor:
        return lora_shrink(self.x, self.a, self.views_a, self.batch)

    def expand(self, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return lora_expand(z, self.b, self.views_b, self.scalings, self.batch, out, self.layout, self.in_chunks)

    def branch(self) -> None:
        """shrink then expand (the gathered rank space stands in for S-LoRA's collective)."""
        self.shrink()
        self.expand(self.z_full, self.out)

    def bytes_moved(self) -> int:
        """Bytes one branch must move: active adapters' factors, x, z written and read, output read + written."""
        es = self.x.element_size()
        active = {s for s in self.slot_ids if s >= 0}
        factors = sum(self.views_a[s].rows * self.views_a[s].cols + self.views_b[s].rows * self.views_b[s].cols
                      for s in active)
        n = len(self.slot_ids)
        out_cols = self.views_b[0].rows
        return es * (factors + n * self.x.shape[1] + n * (self.a.shape[1] + self.z_full.shape[1]) + 2 * n * out_cols)


def spread(tokens: int, adapters: int, base_share: float = 0.0) -> list[int]:
    """Token slots: adapters round-robin (uneven when tokens % adapters), a share of base-only tokens (-1)."""
    ids = [i % adapters for i in range(tokens)]
    for i in range(int(tokens * base_share)):
        ids[(7 * i) % tokens] = -1
    return ids


def check(device: str, dtypes: list[torch.dtype], scale: int) -> list[dict]:
    """Triton vs torch on fresh random mixed batches, every mode and layer kind; shapes divided by `scale`."""
    rows = []
    hidden, ffn = 4096 // scale, 14336 // scale
    for mode in MODES:
        for kind, d_in, d_out in (("column", hidden, ffn), ("row", ffn, hidden)):
            bd = mode == "block_diagonal"
            ranks = [(64, None), (16, None), (64, 2 * TP if bd else None), (32, None)]
            slot_ids = spread(37, 4, base_share=0.1) + [2] * 20  # uneven segments, tokens without adapters
            for dtype in dtypes:
                seed = len(rows)
                results = {}
                for backend in ("torch", "triton"):
                    case = Case(kind, mode, d_in, d_out, ranks, slot_ids, TP, dtype, device, seed)
                    poison = case.out.clone()
                    with use_backend(backend):
                        z = case.shrink()
                        case.expand(case.z_full, case.out)
                    results[backend] = (z.float(), case.out.float(), poison)
                (z_t, out_t, poison), (z_k, out_k, _) = results["torch"], results["triton"]
                err_z = ((z_k - z_t).abs().max() / z_t.abs().max()).item()
                err_out = ((out_k - out_t).abs().max() / out_t.abs().max()).item()
                base_rows = [t for t, s in enumerate(slot_ids) if s < 0]
                untouched = bool(torch.equal(results["triton"][1][base_rows], poison.float()[base_rows]))
                ok = max(err_z, err_out) <= TOLERANCE[dtype] and untouched
                rows.append(dict(mode=mode, kind=kind, dtype=str(dtype).split(".")[-1], d_in=d_in, d_out=d_out,
                                 err_shrink=err_z, err_expand=err_out, base_rows_untouched=untouched,
                                 tolerance=TOLERANCE[dtype], ok=ok))
    return rows


def copy_bandwidth(device: str) -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write), median of 10."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=10, graph=False)
    return 2 * src.numel() * 4 / (ms / 1e3) / 1e9


def time_ms(fn: Callable[[], object], reps: int, graph: bool) -> float:
    """Median milliseconds of fn on the GPU (CUDA events), optionally replayed from a captured CUDA graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            with torch.cuda.graph(g):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        run = g.replay
    else:
        run = fn
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


class Point(NamedTuple):
    """One timing configuration: a layer's TP=8 shard, a sharding mode and a batch."""

    phase: str
    model: str
    layer: str
    kind: str
    d_in: int
    d_out: int
    mode: str
    tokens: int
    adapters: int
    rank: int


def sweep_points(phase: str, shapes: list[tuple[int, int]], ranks: tuple[int, ...]) -> list[Point]:
    """Every model, layer, mode, batch shape and rank of a phase, in the order the sweep prints them."""
    return [Point(phase, model, name, kind, d_in, d_out, mode, tokens, adapters, rank)
            for model in MODEL_SHAPES for name, kind, d_in, d_out in layer_shapes(model) for mode in MODES
            for tokens, adapters in shapes for rank in ranks]


def time_point(point: Point, dtype: torch.dtype, reps: int, copy_gbs: float, seed: int) -> dict:
    """Triton (graph replay) and torch (eager) milliseconds of one branch, and the Triton branch's GB/s."""
    p = point
    case = Case(p.kind, p.mode, p.d_in, p.d_out, [(p.rank, None)] * p.adapters, spread(p.tokens, p.adapters),
                TP, dtype, "cuda", seed)
    with use_backend("triton"):
        t_triton = time_ms(case.branch, reps, graph=True)
    with use_backend("torch"):
        t_torch = time_ms(case.branch, max(5, reps // 4), graph=False)
    gbs = case.bytes_moved() / (t_triton / 1e3) / 1e9
    return dict(phase=p.phase, model=p.model, layer=p.layer, kind=p.kind, mode=p.mode, tokens=p.tokens,
                adapters=p.adapters, rank=p.rank, triton_us=t_triton * 1e3, torch_us=t_torch * 1e3,
                speedup=t_torch / t_triton, gbs=gbs, bandwidth_share=gbs / copy_gbs, bytes=case.bytes_moved())


def sweep(phase: str, shapes: list[tuple[int, int]], ranks: tuple[int, ...], reps: int, deadline: float,
          copy_gbs: float, dtype: torch.dtype) -> list[dict]:
    """Time triton (graph) and torch (eager) for every model, layer, mode, batch shape and rank; stop at deadline."""
    rows = []
    for point in sweep_points(phase, shapes, ranks):
        if time.monotonic() > deadline:
            break
        rows.append(time_point(point, dtype, reps, copy_gbs, seed=len(rows)))
    return rows


def format_checks(rows: list[dict]) -> str:
    """The checks as the CLI prints them (fixed-width, one row per mode / kind / dtype)."""
    lines = [f"{'mode':15} {'kind':7} {'dtype':9} {'shrink err':>10} {'expand err':>10} {'tol':>8}  base rows  ok"]
    for r in rows:
        lines.append(f"{r['mode']:15} {r['kind']:7} {r['dtype']:9} {r['err_shrink']:10.2e} {r['err_expand']:10.2e} "
                     f"{r['tolerance']:8.0e}  {'same' if r['base_rows_untouched'] else 'CHANGED':9}  "
                     f"{'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def format_timings(rows: list[dict]) -> str:
    """Every timed point as the CLI prints it (fixed-width)."""
    lines = [f"{'model':14} {'layer':9} {'mode':15} {'tok':>5} {'ad':>3} {'rank':>4} {'triton us':>9} {'torch us':>9} "
             f"{'x torch':>7} {'GB/s':>7} {'of copy':>7}"]
    for r in rows:
        lines.append(f"{r['model']:14} {r['layer']:9} {r['mode']:15} {r['tokens']:5d} {r['adapters']:3d} "
                     f"{r['rank']:4d} {r['triton_us']:9.1f} {r['torch_us']:9.1f} {r['speedup']:7.2f} {r['gbs']:7.0f} "
                     f"{100 * r['bandwidth_share']:6.0f}%")
    return "\n".join(lines)


# ---- the GPU check's part ----------------------------------------------------------------------------------


def timing_plan(dtypes: Sequence[torch.dtype]) -> list[tuple[Point, torch.dtype]]:
    """Decode and prefill points in every dtype, the REPRESENTATIVE ones (all modes) first: a budget that runs
    out part-way still leaves the summary table complete."""
    points = sweep_points("decode", DECODE, DECODE_RANKS) + sweep_points("prefill", PREFILL, PREFILL_RANKS)
    plan = [(p, dtype) for p in points for dtype in dtypes]
    return sorted(plan, key=lambda pd: (pd[0].phase, pd[0].tokens, pd[0].adapters, pd[0].rank) not in REPRESENTATIVE)


def time_plan(plan: list[tuple[Point, torch.dtype]], reps: int, deadline: float, copy_gbs: float,
              rows: list[dict]) -> None:
    """Append to `rows` the plan's points (tagged with their dtype) measured before `deadline`; a point is not
    started when the previous one's time would overrun it. Appending in place keeps what was measured if a
    later point raises."""
    last_s = 0.0
    for point, dtype in plan:
        if time.monotonic() + last_s > deadline:
            return
        started = time.monotonic()
        rows.append(dict(time_point(point, dtype, reps, copy_gbs, seed=len(rows)), dtype=str(dtype).split(".")[-1]))
        last_s = time.monotonic() - started


def checks_markdown(rows: list[dict], where: str) -> str:
    """The checks for the Markdown report: one error per row (the worse of shrink and expand)."""
    lines = [f"Checks: Triton vs torch, {where}; error = max |triton - torch| / max |torch| over shrink and expand.",
             "", "| mode | kind | dtype | max rel err | tolerance | ok |", "|---|---|---|---:|---:|---|"]
    for r in rows:
        ok = "yes" if r["ok"] else "NO" + ("" if r["base_rows_untouched"] else " (base rows changed)")
        lines.append(f"| {r['mode']} | {r['kind']} | {r['dtype']} | {max(r['err_shrink'], r['err_expand']):.1e} "
                     f"| {r['tolerance']:.0e} | {ok} |")
    return "\n".join(lines)


def timings_markdown(rows: list[dict], copy_gbs: float, skipped: str) -> str:
    """The representative points in BD mode per model / layer / phase / dtype, then every mode summarised."""
    lines = [f"Timings: one TP=8 rank's shrink + expand, Triton (CUDA graph) vs torch (eager); device copy "
             f"{copy_gbs:.0f} GB/s; {len(rows)} points measured, {skipped}.", "",
             "| model | layer | phase | dtype | tokens | adapters | rank | triton ms | torch ms | speed-up | GB/s "
             "| % of copy |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {(model, layer[0]): i for i, (model, layer) in
             enumerate((m, layer) for m in MODEL_SHAPES for layer in layer_shapes(m))}
    for r in sorted(rows, key=lambda r: order[r["model"], r["layer"]]):  # stable: then phase, shape, dtype
        if r["mode"] == "block_diagonal" and (r["phase"], r["tokens"], r["adapters"], r["rank"]) in REPRESENTATIVE:
            lines.append(f"| {r['model']} | {r['layer']} | {r['phase']} | {r['dtype']} | {r['tokens']} "
                         f"| {r['adapters']} | {r['rank']} | {r['triton_us'] / 1e3:.3f} | {r['torch_us'] / 1e3:.3f} "
                         f"| {r['speedup']:.2f} "
                         f"| {r['gbs']:.0f} | {100 * r['bandwidth_share']:.0f}% |")
    lines += ["", "All measured points by mode (block_diagonal above):", "",
              "| phase | dtype | mode | points | median speed-up | min speed-up | median % of copy |",
              "|---|---|---|---:|---:|---:|---:|"]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["phase"], r["dtype"], r["mode"]), []).append(r)
    for (phase, dtype, mode), group in sorted(groups.items()):
        speedups = [r["speedup"] for r in group]
        share = statistics.median(r["bandwidth_share"] for r in group)
        lines.append(f"| {phase} | {dtype} | {mode} | {len(group)} | {statistics.median(speedups):.2f} "
                     f"| {min(speedups):.2f} | {100 * share:.0f}% |")
    return "\n".join(lines)


def gpu_check_part(smoke: bool, budget_s: float, reps: int = 20,
                   timing_dtypes: Sequence[torch.dtype] = GPU_CHECK_TIMING_DTYPES) -> PartResult:
    """The kernels' part of the GPU check: correctness is the verdict ("mismatch" when any check is over its
    tolerance or a token without an adapter was written), timings are the evidence, cut to fit `budget_s`.

    On CUDA: the checks at full shapes in fp32, fp16 and bf16, the copy bandwidth, then the timing plan.
    smoke=True: the checks at 1/INTERPRETER_SCALE widths only (on CPU in Triton's interpreter, fp32 and fp16),
    so that the part itself can be tested without a GPU.
    """
    start = time.monotonic()
    gpu = torch.cuda.is_available()
    if not gpu and not smoke:
        return PartResult("kernels", "skipped", "no CUDA device (smoke=True runs the checks in Triton's interpreter)")
    device = "cuda" if gpu else "cpu"
    scale = INTERPRETER_SCALE if smoke else 1
    checks = check(device, check_dtypes(gpu), scale)
    where = (f"{torch.cuda.get_device_name()}" if gpu else "CPU, Triton interpreter") + (
        f", layer widths / {scale}" if scale > 1 else ", full shapes (Llama-3.1-8B layers)")
    bad = [f"{r['mode']}/{r['kind']}/{r['dtype']}" for r in checks if not r["ok"]]
    data: dict = dict(device=device, torch=torch.__version__, check_scale=scale, checks=checks, checks_ok=not bad)
    notes = [f"{len(bad)} of {len(checks)} checks failed: {', '.join(bad)}"] if bad else []
    markdown = [checks_markdown(checks, where)]
    status = "mismatch" if bad else "ok"
    if smoke:
        data["timings_skipped"] = "smoke run, checks only: timings need the full run on a GPU"
        notes.append("timings skipped: smoke run")
        markdown.append(f"Timings: skipped ({data['timings_skipped']}).")
    else:
        rows: list[dict] = []
        plan = timing_plan(timing_dtypes)
        data.update(timings=rows, points_planned=len(plan))
        try:
            import triton  # lazy: optional (CPU builds of torch come without it); missing, it is a timing error

            data["triton"] = triton.__version__
            data["copy_gbs"] = copy_bandwidth(device)
            time_plan(plan, reps, start + budget_s, data["copy_gbs"], rows)
        except Exception as exc:  # the checks' verdict and the points measured must survive a timing failure
            data["timing_error"] = f"{type(exc).__name__}: {exc}"
            notes.append(f"timing failed: {data['timing_error']}")
            status = status if bad else "error"
        skipped = len(plan) - len(rows)
        data.update(points_measured=len(rows), points_skipped=skipped)
        cause = "timing error" if "timing_error" in data else f"budget {budget_s:.0f} s"
        why_skipped = f"{skipped} of {len(plan)} skipped ({cause})"
        if "copy_gbs" in data:
            markdown.append(timings_markdown(rows, data["copy_gbs"], why_skipped))
        if skipped:
            notes.append(f"timing points: {why_skipped}")
    data["elapsed_s"] = time.monotonic() - start
    return PartResult("kernels", status, "; ".join(notes), data=data, markdown="\n\n".join(markdown))
