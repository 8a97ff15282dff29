"""Time a TP column->row pair (an MLP block) with no adapter, BD-LoRA, S-LoRA and replicated LoRA.

    python tools/bench_layers.py --tp 2 --json runs/bench_layers.json

Spawns `--tp` gloo ranks on this machine (one CPU thread each). The block is megatron's
ColumnParallelLinear d_model -> d_ffn followed by RowParallelLinear d_ffn -> d_model (no bias, no activation),
input [seq, batch, d_model], in training mode: base frozen, adapters trainable, input requires grad.
S-LoRA and replicated use `--rank`; BD-LoRA uses the largest rank (a multiple of nblocks = tp) whose adapter
parameter count does not exceed theirs (PEFT's matching rule). Repeats are interleaved across variants so
that drift in machine load hits every variant alike; each repeat's time is the slowest rank's, and the
table reports the median. Collectives are counted in one extra, untimed forward and backward.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from megatron_bdlora.atomic import atomic_write_text

from megatron_bdlora.config import LoRASettings
from megatron_bdlora.param_count import count_parameters, match_bd_rank
from megatron_bdlora.targets import lora_plan

# known-harmless noise from every spawned rank (CPU build without Transformer Engine; megatron's older c10d names)
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

# spawned ranks import the worker from this file by module name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = (  # (name in the table, LoRA mode or None for the frozen megatron base)
    ("base", None),
    ("bd-lora", "block_diagonal"),
    ("s-lora", "slora"),
    ("replicated", "replicated"),
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHORT = {  # collective names in the table
    "all_reduce": "AR",
    "all_gather_into_tensor": "AG",
    "all_gather": "AG",
    "reduce_scatter_tensor": "RS",
    "reduce_scatter": "RS",
}


PAIR = ("up_proj", "down_proj")  # the column d_model->d_ffn and row d_ffn->d_model of one Llama MLP


def pair_config(d_model: int, d_ffn: int) -> dict:
    """A one-layer Llama shape whose up/down projections are the benchmarked column->row pair."""
    return {"hidden_size": d_model, "intermediate_size": d_ffn, "num_attention_heads": 1, "num_hidden_layers": 1}


def pair_parameters(mode: str, d_model: int, d_ffn: int, rank: int, tp: int) -> int:
    """Adapter parameters of the column->row pair in one mode (replicated factors counted once)."""
    return count_parameters(pair_config(d_model, d_ffn), PAIR, mode, rank, tp if mode == "block_diagonal" else None)


def _build_pair(mode: str | None, rank: int, args: dict, tp: int):
    """Column d_model->d_ffn and row d_ffn->d_model on this rank, with or without an adapter."""
    from megatron.core import ModelParallelConfig

    from megatron_bdlora.config import LoRASettings
    from megatron_bdlora.layers import LoRALayerSpec, make_parallel_linear

    config = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        params_dtype=DTYPES[args["dtype"]],
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )
    layers = []
    shapes = (("column", "up_proj", args["d_model"], args["d_ffn"]), ("row", "down_proj", args["d_ffn"], args["d_model"]))
    for kind, proj, d_in, d_out in shapes:
        spec = None
        if mode is not None:
            settings = LoRASettings(rank=rank, alpha=2.0 * rank, mode=mode)
            spec = LoRALayerSpec(settings, ((proj, d_out),), layer_name=f"mlp.{proj}")
        layer = make_parallel_linear(kind, d_in, d_out, config, spec)
        if mode is not None:  # a trained adapter: non-zero B (PEFT initialises it to zero)
            with torch.no_grad():
                layer.lora[proj].lora_B.normal_(std=0.01)
        layers.append(layer)
    return layers


def _forward(layers, x: torch.Tensor) -> torch.Tensor:
    """[s, b, d_model] replicated -> [s, b, d_ffn/tp] -> [s, b, d_model] (all-reduced by the row layer)."""
    column, row = layers
    h, _ = column(x)  # [s, b, d_ffn/tp]
    y, _ = row(h)  # [s, b, d_model]
    return y


def _reset_grads(layers, x: torch.Tensor) -> None:
    x.grad = None
    for layer in layers:
        for p in layer.parameters():
            p.grad = None


def _timed(fn) -> float:
    """Milliseconds of fn() on this rank, started together with the other ranks."""
    torch.distributed.barrier()
    t0 = time.perf_counter()
    fn()
    elapsed = (time.perf_counter() - t0) * 1e3
    torch.distributed.barrier()  # nobody starts the next region while a peer still works on this one
    return elapsed


def bench_worker(info, args: dict, ranks: dict) -> dict:
    """On one TP rank: per-variant forward / forward+backward times, collective counts, stored parameters."""
    from tqdm import tqdm

    from megatron_bdlora.comm_count import count_collectives

    dtype = DTYPES[args["dtype"]]
    tp = info.tp_size
    pairs = {}
    for name, mode in VARIANTS:
        torch.manual_seed(args["seed"])  # same base weights in every variant
        pairs[name] = _build_pair(mode, ranks[name], args, tp)
    gen = torch.Generator().manual_seed(args["seed"] + 1)  # identical input on every rank (column input is replicated)
    shape = (args["seq"], args["batch"], args["d_model"])
    x = torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True)  # [s, b, d_model]
    dy = torch.randn(*shape, generator=gen).to(dtype)  # [s, b, d_model]

    out: dict = {}
    for name, layers in pairs.items():  # collectives and stored adapter size, untimed
        _reset_grads(layers, x)
        with count_collectives() as fwd:
            y = _forward(layers, x)
        with count_collectives() as bwd:
            y.backward(dy)
        adapter = [p for layer in layers for n, p in layer.named_parameters() if n.startswith("lora.")]
        out[name] = dict(
            fwd_ms=[],
            fwd_bwd_ms=[],
            coll_fwd=dict(fwd),
            coll_bwd=dict(bwd),
            stored=sum(p.numel() for p in adapter),
            frozen_ok=all(layer.weight.grad is None for layer in layers),
            trained_ok=all(p.requires_grad and p.grad is not None for p in adapter),
        )

    def step_fwd(layers):
        return lambda: _forward(layers, x)

    def step_fwd_bwd(layers):
        return lambda: _forward(layers, x).backward(dy)

    total = (args["warmup"] + args["repeats"]) * len(pairs)
    bar = tqdm(total=total, desc="bench", unit="step", disable=None if info.rank == 0 else True, file=sys.stderr)
    gc.collect()
    gc.disable()
    try:
        for rep in range(args["warmup"] + args["repeats"]):
            for name, layers in pairs.items():  # interleaved: load drift hits all variants alike
                _reset_grads(layers, x)
                t_fwd = _timed(step_fwd(layers))
                _reset_grads(layers, x)
                t_fwd_bwd = _timed(step_fwd_bwd(layers))
                if rep >= args["warmup"]:
                    out[name]["fwd_ms"].append(t_fwd)
                    out[name]["fwd_bwd_ms"].append(t_fwd_bwd)
                bar.update(1)
    finally:
        gc.enable()
        bar.close()
    return out


def _collectives_label(counts: dict) -> str:
    """'3 (2AR+AG)': total, then the kinds; '0' when none."""
    total = sum(counts.values())
    if not total:
        return "0"
    parts = [f"{n if n > 1 else ''}{_SHORT.get(op, op)}" for op, n in sorted(counts.items())]
    return f"{total} ({'+'.join(parts)})"


def _environment() -> dict:
    import megatron.core

    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu_model)
    except OSError:
        pass
    return dict(
        torch=torch.__version__,
        megatron_core=getattr(megatron.core, "__version__", "unknown"),
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_model=cpu_model,
        host_cpu_count=os.cpu_count(),
        usable_cpu_count=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        device="cpu",
        backend="gloo",
        threads_per_rank=1,
    )


def summarise(args: dict, ranks: dict, per_rank: list[dict]) -> list[dict]:
    """One row per variant: median over repeats of the slowest rank's time, ratios to base, collectives."""
    rows = []
    medians = {}
    for name, mode in VARIANTS:
        fwd = [max(r[name]["fwd_ms"][i] for r in per_rank) for i in range(args["repeats"])]
        fwd_bwd = [max(r[name]["fwd_bwd_ms"][i] for r in per_rank) for i in range(args["repeats"])]
        medians[name] = (statistics.median(fwd), statistics.median(fwd_bwd))
        r0 = per_rank[0][name]
        rows.append(
            dict(
                variant=name,
                mode=mode,
                rank=ranks[name] if mode else None,
                adapter_params=pair_parameters(mode, args["d_model"], args["d_ffn"], ranks[name], args["tp"]) if mode else 0,
                adapter_params_per_rank=r0["stored"],
                fwd_ms_median=medians[name][0],
                fwd_ratio=medians[name][0] / medians["base"][0],
                fwd_bwd_ms_median=medians[name][1],
                fwd_bwd_ratio=medians[name][1] / medians["base"][1],
                fwd_ms_min=min(fwd),  # on a shared machine the fastest repeat is the least disturbed one
                fwd_bwd_ms_min=min(fwd_bwd),
                collectives_fwd=r0["coll_fwd"],
                collectives_bwd=r0["coll_bwd"],
                base_frozen=all(r[name]["frozen_ok"] for r in per_rank),
                adapters_get_grads=all(r[name]["trained_ok"] for r in per_rank),
                fwd_ms=fwd,
                fwd_bwd_ms=fwd_bwd,
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of the rows (fixed-width, pastes into Markdown as a code block); ms are medians, (min) the fastest repeat."""
    head = ("variant", "rank", "params", "params/rank", "fwd ms", "fwd x", "fwd min", "fwd+bwd ms", "fwd+bwd x", "fwd+bwd min", "coll fwd", "coll bwd")
    body = [
        (
            r["variant"],
            "-" if r["rank"] is None else str(r["rank"]),
            f"{r['adapter_params']:,}",
            f"{r['adapter_params_per_rank']:,}",
            f"{r['fwd_ms_median']:.2f}",
            f"{r['fwd_ratio']:.3f}",
            f"{r['fwd_ms_min']:.2f}",
            f"{r['fwd_bwd_ms_median']:.2f}",
            f"{r['fwd_bwd_ratio']:.3f}",
            f"{r['fwd_bwd_ms_min']:.2f}",
            _collectives_label(r["collectives_fwd"]),
            _collectives_label(r["collectives_bwd"]),
        )
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(b) for b in body])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time forward and forward+backward of a TP column->row MLP pair with no adapter, BD-LoRA, "
        "S-LoRA and replicated LoRA at matched adapter parameter counts (local gloo ranks on CPU).",
    )
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel degree = number of local gloo ranks spawned; also BD's nblocks (default 2)")
    p.add_argument("--json", type=Path, default=None, help="write config, environment and all rows (with per-repeat times) to this JSON file")
    p.add_argument("--d-model", type=int, default=1024, help="hidden size: column input and row output width (default 1024)")
    p.add_argument("--d-ffn", type=int, default=2816, help="MLP width: column output and row input width, split over TP (default 2816)")
    p.add_argument("--seq", type=int, default=128, help="sequence length s of the [s, b, d_model] input (default 128)")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size b of the [s, b, d_model] input (default 4)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of S-LoRA and replicated; BD's rank is matched to its parameter count (default 16)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per variant; the table reports the median (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repeats per variant before timing (default 3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter and activation dtype (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base weights and the input (default 0)")
    args = p.parse_args(argv)
    for flag in ("tp", "d_model", "d_ffn", "seq", "batch", "rank", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write the JSON; returns what the JSON holds."""
    args = parse_args(argv)
    try:
        bd_rank = match_bd_rank(pair_config(args.d_model, args.d_ffn), PAIR, args.tp, args.rank)
        ranks = {name: (bd_rank if mode == "block_diagonal" else args.rank) for name, mode in VARIANTS}
        for name, mode in VARIANTS[1:]:  # validate every shape at this TP before spawning
            settings = LoRASettings(rank=ranks[name], mode=mode, nblocks=args.tp if mode == "block_diagonal" else None)
            for proj in PAIR:
                lora_plan(pair_config(args.d_model, args.d_ffn), proj, settings, args.tp)
    except ValueError as e:
        sys.exit(f"bench_layers: {e}")
    if pair_parameters("block_diagonal", args.d_model, args.d_ffn, bd_rank, args.tp) > pair_parameters("slora", args.d_model, args.d_ffn, args.rank, args.tp):
        print(f"bench_layers: note: even BD rank {bd_rank} has more parameters than LoRA rank {args.rank}", file=sys.stderr)
    cfg = dict(vars(args), json=str(args.json) if args.json else None, nblocks=args.tp, bd_rank=bd_rank, lora_rank=args.rank)
    cfg.update(
        block="column d_model->d_ffn, row d_ffn->d_model, no bias, no activation",
        training_mode="base frozen, adapters trainable, input requires grad",
        timing="median over repeats of the slowest rank's time; barrier before and after each timed region",
    )

    # this benchmark measures the CPU/gloo path: keep spawned ranks off any GPU (init_parallel picks nccl with CUDA)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import bench_layers  # the worker by module name, so spawned ranks can unpickle it

    from megatron_bdlora.local_ranks import run_distributed

    per_rank = run_distributed(bench_layers.bench_worker, args.tp, vars(args) | {"json": None}, ranks)
    rows = summarise(cfg, ranks, per_rank)
    print(
        f"TP={args.tp} gloo, {args.dtype}, x=[{args.seq}, {args.batch}, {args.d_model}], d_ffn={args.d_ffn}, "
        f"LoRA rank {args.rank} vs BD rank {bd_rank} (nblocks {args.tp}); median of {args.repeats} repeats, slowest rank"
    )
    print(format_table(rows))
    result = dict(config=cfg, environment=_environment(), rows=rows)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
