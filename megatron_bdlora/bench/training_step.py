"""One training step (forward + backward + optimizer) timed per sharding mode on the whole model, at matched
parameters: the work of tools/bench_train.py (the variants, the timing and the collectives: its docstring).

`train_worker` is what the tool runs on its spawned gloo ranks (they unpickle it from this module).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_bdlora.bench.results import write_json
from megatron_bdlora.bench.tables import collectives_label
from megatron_bdlora.comm_count import count_collectives
from megatron_bdlora.config import ALL_TARGETS, LoRASettings
from megatron_bdlora.local_ranks import run_distributed
from megatron_bdlora.param_count import BUILTIN_CONFIGS, count_parameters, match_bd_rank
from megatron_bdlora.training.config import TrainConfig

# known-harmless noise from every spawned rank (CPU build without Transformer Engine; megatron's older c10d names)
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

VARIANTS = ("base", "block_diagonal", "slora", "replicated")
LABELS = {"base": "frozen base, no adapter", "block_diagonal": "BD-LoRA (matched)", "slora": "S-LoRA",
          "replicated": "replicated"}


def hf_shape(model_shape: str | None, layers: int | None) -> dict:
    """HF config of the benchmarked model: SmolLM2-135M's, or a Llama-3.1 shape, with `layers` layers when given."""
    name = model_shape or "smollm2-135m"
    config = dict(BUILTIN_CONFIGS[name], model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152,
                  max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=name == "smollm2-135m")
    if layers:
        config["num_hidden_layers"] = layers
    return config


def variant_settings(hf_config: dict, rank: int, tp: int) -> dict:
    """Mode -> LoRASettings (None for the base): BD at the matched rank, the others at `rank`."""
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


def train_worker(info: Any, spec: dict) -> dict | None:
    """On one TP rank: build every variant, step them in turn, time and count collectives."""
    # lazy: megatron-core (seconds, warnings on import) loads in the ranks only; tools/bench_train.py imports this
    # module before it parses its flags
    from megatron_bdlora.model import build_model
    from megatron_bdlora.training.deepspeed_engine import build_engine
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
            cfg.parallel.tp = tp
            cfg.parallel.micro_batch_size = cfg.parallel.global_batch_size = spec["micro_batch"]
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
    """One row per variant: median step time (the slowest rank's), ratio to the base, adapter size, collectives."""
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
    """One line per variant: rank, adapter parameters, step time, ratio to the base, collectives per step."""
    lines = [f"{'variant':26} {'rank':>4} {'adapter params':>14} {'step ms':>9} {'x base':>7}  collectives per step"]
    for r in rows:
        lines.append(f"{r['label']:26} {r['rank'] or '-':>4} {r['parameters']:>14,} {r['step_ms']:9.1f} "
                     f"{r['vs_base']:7.3f}  {collectives_label(r['collectives'])}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Spawn --tp gloo ranks, time every variant as tools/bench_train.py's flags say, print the table and write the
    JSON; returns what the JSON holds."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    hf_config = hf_shape(args.model_shape, args.layers)
    if hf_config["num_key_value_heads"] % args.tp:
        raise SystemExit(f"--tp {args.tp} does not divide the model's {hf_config['num_key_value_heads']} KV heads")
    spec = dict(hf_config=hf_config, rank=args.rank, seq_length=args.seq_length, micro_batch=args.micro_batch,
                repeats=args.repeats, threads=args.threads, seed=args.seed)
    raw = run_distributed(train_worker, args.tp, spec, timeout=3600)[0]
    settings = variant_settings(hf_config, args.rank, args.tp)
    rows = summarise(raw, settings, hf_config, args.tp)
    title = (f"training step at TP={args.tp}, {args.model_shape or 'SmolLM2-135M'} shape, "
             f"{hf_config['num_hidden_layers']} layer(s), {args.micro_batch}x{args.seq_length} tokens, float32, "
             f"{args.threads} thread(s)/rank; median of {args.repeats}")
    print(title)
    print(format_table(rows))
    result = dict(title=title, config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  hf_config=hf_config, rows=rows)
    if args.json:
        write_json(args.json, result)
    return result
