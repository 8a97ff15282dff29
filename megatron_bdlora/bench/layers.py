"""A TP column->row pair (an MLP block) timed with no adapter, BD-LoRA, S-LoRA and replicated LoRA: the work of
tools/bench_layers.py (the block, the ranks, what is timed and how: that tool's help and docstring).

`bench_worker` is what the tool runs on its spawned gloo ranks (they unpickle it from this module).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from megatron_bdlora.bench.environment import machine, package_versions, usable_cpu_count
from megatron_bdlora.bench.results import write_json
from megatron_bdlora.bench.tables import collectives_label, fixed_width_table
from megatron_bdlora.comm_count import count_collectives
from megatron_bdlora.config import LoRASettings
from megatron_bdlora.local_ranks import run_distributed
from megatron_bdlora.param_count import count_parameters, match_bd_rank
from megatron_bdlora.targets import lora_plan

# known-harmless noise from every spawned rank (CPU build without Transformer Engine; megatron's older c10d names)
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

VARIANTS = (  # (name in the table, LoRA mode or None for the frozen megatron base)
    ("base", None),
    ("bd-lora", "block_diagonal"),
    ("s-lora", "slora"),
    ("replicated", "replicated"),
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAIR = ("up_proj", "down_proj")  # the column d_model->d_ffn and row d_ffn->d_model of one Llama MLP


def pair_config(d_model: int, d_ffn: int) -> dict:
    """A one-layer Llama shape whose up/down projections are the benchmarked column->row pair."""
    return {"hidden_size": d_model, "intermediate_size": d_ffn, "num_attention_heads": 1, "num_hidden_layers": 1}


def pair_parameters(mode: str, d_model: int, d_ffn: int, rank: int, tp: int) -> int:
    """Adapter parameters of the column->row pair in one mode (replicated factors counted once)."""
    return count_parameters(pair_config(d_model, d_ffn), PAIR, mode, rank, tp if mode == "block_diagonal" else None)


def _build_pair(mode: str | None, rank: int, args: dict, tp: int) -> list[torch.nn.Module]:
    """Column d_model->d_ffn and row d_ffn->d_model on this rank, with or without an adapter."""
    # lazy: megatron-core (seconds, warnings on import) loads in the ranks only; tools/bench_layers.py imports this
    # module before it parses its flags
    from megatron.core import ModelParallelConfig

    from megatron_bdlora.layers import LoRALayerSpec, make_parallel_linear

    config = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        params_dtype=DTYPES[args["dtype"]],
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )
    layers = []
    shapes = (("column", "up_proj", args["d_model"], args["d_ffn"]),
              ("row", "down_proj", args["d_ffn"], args["d_model"]))
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


def _forward(layers: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    """[s, b, d_model] replicated -> [s, b, d_ffn/tp] -> [s, b, d_model] (all-reduced by the row layer)."""
    column, row = layers
    h, _ = column(x)  # [s, b, d_ffn/tp]
    y, _ = row(h)  # [s, b, d_model]
    return y


def _reset_grads(layers: list[torch.nn.Module], x: torch.Tensor) -> None:
    x.grad = None
    for layer in layers:
        for p in layer.parameters():
            p.grad = None


def _timed(fn: Callable[[], Any]) -> float:
    """Milliseconds of fn() on this rank, started together with the other ranks."""
    torch.distributed.barrier()
    t0 = time.perf_counter()
    fn()
    elapsed = (time.perf_counter() - t0) * 1e3
    torch.distributed.barrier()  # nobody starts the next region while a peer still works on this one
    return elapsed


def bench_worker(info: Any, args: dict, ranks: dict) -> dict:
    """On one TP rank: per-variant forward / forward+backward times, collective counts, stored parameters."""
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


def environment() -> dict:
    """The run's machine and versions, under the keys of the benchmark's JSON (CPU, gloo, one thread per rank)."""
    host = machine()
    return dict(
        torch=torch.__version__,
        megatron_core=package_versions(("megatron-core",))["megatron-core"] or "unknown",
        python=host["python"],
        platform=host["platform"],
        cpu_model=host["cpu_model"],
        host_cpu_count=host["cpu_count"],
        usable_cpu_count=usable_cpu_count(),
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
                adapter_params=(pair_parameters(mode, args["d_model"], args["d_ffn"], ranks[name], args["tp"])
                                if mode else 0),
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
    """Plain-text table of the rows (fixed-width, pastes into Markdown as a code block); ms are medians, (min) the
    fastest repeat."""
    head = ("variant", "rank", "params", "params/rank", "fwd ms", "fwd x", "fwd min", "fwd+bwd ms", "fwd+bwd x",
            "fwd+bwd min", "coll fwd", "coll bwd")
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
            collectives_label(r["collectives_fwd"]),
            collectives_label(r["collectives_bwd"]),
        )
        for r in rows
    ]
    return fixed_width_table(head, body)


def matched_ranks(d_model: int, d_ffn: int, tp: int, rank: int) -> dict[str, int]:
    """Variant -> its rank: LoRA's `rank` for S-LoRA and replicated, the parameter-matched BD rank (nblocks = tp) for
    BD; every variant's shapes checked at this TP (ValueError naming the problem) before any rank is spawned."""
    bd_rank = match_bd_rank(pair_config(d_model, d_ffn), PAIR, tp, rank)
    ranks = {name: (bd_rank if mode == "block_diagonal" else rank) for name, mode in VARIANTS}
    for name, mode in VARIANTS[1:]:
        settings = LoRASettings(rank=ranks[name], mode=mode, nblocks=tp if mode == "block_diagonal" else None)
        for proj in PAIR:
            lora_plan(pair_config(d_model, d_ffn), proj, settings, tp)
    return ranks


def run(args: argparse.Namespace, ranks: dict[str, int]) -> dict:
    """Spawn --tp gloo ranks, time every variant at these ranks (matched_ranks), print the table and write the JSON;
    returns what the JSON holds."""
    bd_rank = ranks["bd-lora"]
    bd_params = pair_parameters("block_diagonal", args.d_model, args.d_ffn, bd_rank, args.tp)
    if bd_params > pair_parameters("slora", args.d_model, args.d_ffn, args.rank, args.tp):
        print(f"bench_layers: note: even BD rank {bd_rank} has more parameters than LoRA rank {args.rank}",
              file=sys.stderr)
    cfg = dict(vars(args), json=str(args.json) if args.json else None, nblocks=args.tp, bd_rank=bd_rank,
               lora_rank=args.rank)
    cfg.update(
        block="column d_model->d_ffn, row d_ffn->d_model, no bias, no activation",
        training_mode="base frozen, adapters trainable, input requires grad",
        timing="median over repeats of the slowest rank's time; barrier before and after each timed region",
    )

    # this benchmark measures the CPU/gloo path: keep spawned ranks off any GPU (init_parallel picks nccl with CUDA)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    per_rank = run_distributed(bench_worker, args.tp, vars(args) | {"json": None}, ranks)
    rows = summarise(cfg, ranks, per_rank)
    print(
        f"TP={args.tp} gloo, {args.dtype}, x=[{args.seq}, {args.batch}, {args.d_model}], d_ffn={args.d_ffn}, "
        f"LoRA rank {args.rank} vs BD rank {bd_rank} (nblocks {args.tp}); median of {args.repeats} repeats, "
        "slowest rank"
    )
    print(format_table(rows))
    result = dict(config=cfg, environment=environment(), rows=rows)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result
