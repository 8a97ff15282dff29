"""Time one training step (forward + backward + optimizer) per sharding mode on the whole model, at matched parameters.

    python tools/bench_train.py --tp 3 --json runs/bench_train_smollm2.json                  # SmolLM2-135M (3 KV heads)
    python tools/bench_train.py --tp 2 --model-shape llama-3.1-8b --layers 1 --json runs/bench_train_8b.json

Spawns --tp gloo ranks (one thread each). Variants: the frozen base with no adapter (forward + backward of the
activations only: the floor every adapter pays), BD-LoRA at the rank whose parameter count matches LoRA's
(PEFT's rule, nblocks = TP), S-LoRA and replicated at --rank; every adapter on all seven projections. Each
adapter variant trains through the project's own DeepSpeed engine (`training.engine.build_engine`: AdamW,
gradient clipping with the TP-aware norm), one micro-batch of random token ids per step. Models are built once
and their steps interleaved, so drift in machine load hits every variant alike; the table shows the median of
--repeats steps (the slowest rank's time of each) and the collectives of one extra, untimed step by kind.
The base model's weights are random (seeded); SmolLM2's are its real shape with random values too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
# spawned ranks import the worker from this file by module name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_serving import collectives_label  # noqa: E402  (one table of collective names for the benchmarks)
from megatron_bdlora.atomic import atomic_write_text  # noqa: E402

VARIANTS = ("base", "block_diagonal", "slora", "replicated")
LABELS = {"base": "frozen base, no adapter", "block_diagonal": "BD-LoRA (matched)", "slora": "S-LoRA", "replicated": "replicated"}


def hf_shape(args: argparse.Namespace) -> dict:
    """HF config of the benchmarked model: SmolLM2-135M's, or a Llama-3.1 shape with --layers layers."""
    from megatron_bdlora.param_count import BUILTIN_CONFIGS

    name = args.model_shape or "smollm2-135m"
    config = dict(BUILTIN_CONFIGS[name], model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, max_position_embeddings=4096, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=name == "smollm2-135m")
    if args.layers:
        config["num_hidden_layers"] = args.layers
    return config


def variant_settings(hf_config: dict, rank: int, tp: int) -> dict:
    """Mode -> LoRASettings (None for the base): BD at the matched rank, the others at `rank`."""
    from megatron_bdlora.config import ALL_TARGETS, LoRASettings
    from megatron_bdlora.param_count import match_bd_rank

    bd_rank = match_bd_rank(hf_config, ALL_TARGETS, tp, rank)
    return {
        "base": None,
        "block_diagonal": LoRASettings(rank=bd_rank, alpha=2.0 * bd_rank, nblocks=tp),
        "slora": LoRASettings(rank=rank, alpha=2.0 * rank, mode="slora"),
        "replicated": LoRASettings(rank=rank, alpha=2.0 * rank, mode="replicated"),
    }


def _random_base(model: torch.nn.Module, seed: int) -> None:
    """Seeded random values for the frozen weights (megatron leaves them uninitialised), adapters untouched."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02 if p.dim() > 1 else torch.ones(p.shape))


def train_worker(info, spec: dict) -> dict | None:
    """On one TP rank: build every variant, step them in turn, time and count collectives."""
    import torch.distributed as dist

    from megatron_bdlora.comm_count import count_collectives
    from megatron_bdlora.model import build_model
    from megatron_bdlora.training.config import TrainConfig
    from megatron_bdlora.training.engine import build_engine
    from megatron_bdlora.training.loop import token_losses

    torch.set_num_threads(spec["threads"])
    hf_config, tp = spec["hf_config"], info.tp_size
    settings = variant_settings(hf_config, spec["rank"], tp)
    gen = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(100, hf_config["vocab_size"], (spec["micro_batch"], spec["seq_length"]), generator=gen)
    batch = dict(input_ids=ids, labels=torch.roll(ids, -1, dims=1))
    steps = {}
    for name in VARIANTS:
        model = build_model(hf_config, tp, settings[name])
        _random_base(model, spec["seed"] + info.tp_rank)
        if settings[name] is None:
            model.requires_grad_(False)  # frozen base: without an adapter build_model leaves every weight trainable

            def hook(module, inputs, output):
                return output.detach().requires_grad_()  # the activations' backward, with nothing to update

            model.embedding.register_forward_hook(hook)
            steps[name] = (lambda m: lambda: token_losses(m, batch).mean().backward())(model)
        else:
            cfg = TrainConfig()
            cfg.parallel.tp, cfg.parallel.micro_batch_size, cfg.parallel.global_batch_size = tp, spec["micro_batch"], spec["micro_batch"]
            engine, _ = build_engine(model, cfg, grad_accum=1)

            def step(engine=engine):
                engine.backward(token_losses(engine, batch).mean())
                engine.step()

            steps[name] = step
    out = {name: dict(times=[], collectives=None) for name in VARIANTS}
    for name, step in steps.items():  # warm-up, and one counted step
        step()
        with count_collectives() as counts:
            step()
        out[name]["collectives"] = dict(counts)
    for rep in range(spec["repeats"]):
        for name in VARIANTS[rep % len(VARIANTS):] + VARIANTS[: rep % len(VARIANTS)]:
            dist.barrier()
            t = time.perf_counter()
            steps[name]()
            slowest = torch.tensor([time.perf_counter() - t])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            out[name]["times"].append(slowest.item())
    return out if info.rank == 0 else None


def summarise(raw: dict, settings: dict, hf_config: dict, tp: int) -> list[dict]:
    from megatron_bdlora.config import ALL_TARGETS
    from megatron_bdlora.param_count import count_parameters

    rows = []
    base_ms = 1e3 * statistics.median(raw["base"]["times"])
    for name in VARIANTS:
        s = settings[name]
        ms = 1e3 * statistics.median(raw[name]["times"])
        params = 0 if s is None else count_parameters(hf_config, ALL_TARGETS, s.mode, s.rank, s.nblocks)
        rows.append(dict(variant=name, label=LABELS[name], rank=None if s is None else s.rank, parameters=params,
                         step_ms=ms, step_ms_repeats=[1e3 * t for t in raw[name]["times"]], vs_base=ms / base_ms,
                         collectives=raw[name]["collectives"]))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'variant':26} {'rank':>4} {'adapter params':>14} {'step ms':>9} {'x base':>7}  collectives per step"]
    for r in rows:
        lines.append(f"{r['label']:26} {r['rank'] or '-':>4} {r['parameters']:>14,} {r['step_ms']:9.1f} "
                     f"{r['vs_base']:7.3f}  {collectives_label(r['collectives'])}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=3, help="TP degree = gloo ranks; SmolLM2 (3 KV heads) needs 1 or 3 (default 3)")
    p.add_argument("--model-shape", choices=("llama-3.1-8b", "llama-3.1-70b"), default=None,
                   help="a random Llama with this model's per-layer widths (default: SmolLM2-135M's shape)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's; 1 with --model-shape)")
    p.add_argument("--rank", type=int, default=None,
                   help="LoRA rank r of S-LoRA and replicated, a multiple of --tp; BD at the matched rank (default: 16 "
                        "rounded up to a multiple of --tp)")
    p.add_argument("--seq-length", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per step (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant, interleaved (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default 0)")
    p.add_argument("--json", type=Path, default=None, help="write the table, settings and machine to this JSON file")
    args = p.parse_args(argv)
    if args.model_shape and not args.layers:
        args.layers = 1
    args.rank = args.rank or -(-16 // args.tp) * args.tp
    if args.rank % args.tp:
        p.error(f"--rank {args.rank} must be a multiple of --tp {args.tp} (S-LoRA shards the rank)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import bench_train  # the worker by module name, so spawned ranks can unpickle it

    from megatron_bdlora.local_ranks import run_distributed

    hf_config = hf_shape(args)
    if hf_config["num_key_value_heads"] % args.tp:
        raise SystemExit(f"--tp {args.tp} does not divide the model's {hf_config['num_key_value_heads']} KV heads")
    spec = dict(hf_config=hf_config, rank=args.rank, seq_length=args.seq_length, micro_batch=args.micro_batch,
                repeats=args.repeats, threads=args.threads, seed=args.seed)
    raw = run_distributed(bench_train.train_worker, args.tp, spec, timeout=3600)[0]
    settings = variant_settings(hf_config, args.rank, args.tp)
    rows = summarise(raw, settings, hf_config, args.tp)
    title = (f"training step at TP={args.tp}, {args.model_shape or 'SmolLM2-135M'} shape, {hf_config['num_hidden_layers']} "
             f"layer(s), {args.micro_batch}x{args.seq_length} tokens, float32, {args.threads} thread(s)/rank; median of "
             f"{args.repeats}")
    print(title)
    print(format_table(rows))
    result = dict(title=title, config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  hf_config=hf_config, rows=rows)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
