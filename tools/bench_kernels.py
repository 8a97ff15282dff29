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
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run interpreted

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bdlora.atomic import atomic_write_text  # noqa: E402
from megatron_bdlora.ops import FactorView, OutputLayout, SlotBatch, SlotViews, lora_expand, lora_shrink, use_backend  # noqa: E402
from megatron_bdlora.sharding import ShardingPlan  # noqa: E402

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


def layer_shapes(model: str) -> list[tuple[str, str, int, int]]:
    """(name, kind, d_in, d_out) of the full layers whose TP=8 shards are timed."""
    hidden, ffn, heads, _, head_dim = MODEL_SHAPES[model]
    return [
        ("q_proj", "column", hidden, heads * head_dim),
        ("gate_proj", "column", hidden, ffn),
        ("o_proj", "row", heads * head_dim, hidden),
        ("down_proj", "row", ffn, hidden),
    ]


class Case:
    """One rank's LoRA branch for a batch: factor stacks, slot views, inputs, output and its layout."""

    def __init__(self, kind, mode, d_in, d_out, ranks, slot_ids, tp, dtype, device, seed):
        gen = torch.Generator(device).manual_seed(seed)  # drawn on the device: a sweep builds ~500 cases
        rand = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
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
        factors = sum(self.views_a[s].rows * self.views_a[s].cols + self.views_b[s].rows * self.views_b[s].cols for s in active)
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


def time_ms(fn, reps: int, graph: bool) -> float:
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


def sweep(phase: str, shapes: list[tuple[int, int]], ranks: tuple[int, ...], reps: int, deadline: float,
          copy_gbs: float, dtype: torch.dtype) -> list[dict]:
    """Time triton (graph) and torch (eager) for every model, layer, mode, batch shape and rank."""
    rows = []
    for model in MODEL_SHAPES:
        for name, kind, d_in, d_out in layer_shapes(model):
            for mode in MODES:
                for tokens, adapters in shapes:
                    for rank in ranks:
                        if time.monotonic() > deadline:
                            return rows
                        case = Case(kind, mode, d_in, d_out, [(rank, None)] * adapters, spread(tokens, adapters),
                                    TP, dtype, "cuda", len(rows))
                        with use_backend("triton"):
                            t_triton = time_ms(case.branch, reps, graph=True)
                        with use_backend("torch"):
                            t_torch = time_ms(case.branch, max(5, reps // 4), graph=False)
                        gbs = case.bytes_moved() / (t_triton / 1e3) / 1e9
                        rows.append(dict(phase=phase, model=model, layer=name, kind=kind, mode=mode, tokens=tokens,
                                         adapters=adapters, rank=rank, triton_us=t_triton * 1e3, torch_us=t_torch * 1e3,
                                         speedup=t_torch / t_triton, gbs=gbs, bandwidth_share=gbs / copy_gbs,
                                         bytes=case.bytes_moved()))
    return rows


def format_checks(rows: list[dict]) -> str:
    lines = [f"{'mode':15} {'kind':7} {'dtype':9} {'shrink err':>10} {'expand err':>10} {'tol':>8}  base rows  ok"]
    for r in rows:
        lines.append(f"{r['mode']:15} {r['kind']:7} {r['dtype']:9} {r['err_shrink']:10.2e} {r['err_expand']:10.2e} "
                     f"{r['tolerance']:8.0e}  {'same' if r['base_rows_untouched'] else 'CHANGED':9}  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def format_timings(rows: list[dict]) -> str:
    lines = [f"{'model':14} {'layer':9} {'mode':15} {'tok':>5} {'ad':>3} {'rank':>4} {'triton us':>9} {'torch us':>9} "
             f"{'x torch':>7} {'GB/s':>7} {'of copy':>7}"]
    for r in rows:
        lines.append(f"{r['model']:14} {r['layer']:9} {r['mode']:15} {r['tokens']:5d} {r['adapters']:3d} {r['rank']:4d} "
                     f"{r['triton_us']:9.1f} {r['torch_us']:9.1f} {r['speedup']:7.2f} {r['gbs']:7.0f} "
                     f"{100 * r['bandwidth_share']:6.0f}%")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if gpu else [])  # bf16 dot is wrong interpreted
    checks = check(device, dtypes, args.check_scale or (1 if gpu else 64))
    print(f"correctness: Triton vs torch on {'the GPU' if gpu else 'CPU (Triton interpreter)'}")
    print(format_checks(checks))
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()})",
                  torch=torch.__version__, checks=checks, checks_ok=all(r["ok"] for r in checks))
    if gpu:
        import triton

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
