"""What one run of the CPU serving benchmark (tools/bench_serving.py) serves: the seeded workload, the base model, the
adapter sets and the systems compared.

A system is one row of the benchmark's tables: a loop mode of our serving loop (or PEFT) and the adapter variant its
requests use. Default: one BD adapter set, served by every mode through exact conversion; --paper-ranks: plain LoRA
at r in S-LoRA / replicated mode against BD at 2r, 4r and LoRA's parameter count.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from megatron_bdlora.base_models import EMBEDDED, ensure_megatron_base, resolve_hf_base
from megatron_bdlora.bench.workload import write_random_adapter
from megatron_bdlora.config import ALL_TARGETS, LoRASettings
from megatron_bdlora.param_count import match_bd_rank

MODES = ("block_diagonal", "slora", "replicated")  # the adapter modes of the sharding plan, in table order
NONE = "none"  # every request to the base model, on the block_diagonal loop
PEFT = "peft"  # transformers + PEFT mixed-adapter batching (TP 1)
LABELS = {"block_diagonal": "BD", "slora": "S-LoRA", "replicated": "replicated", NONE: "none", PEFT: "PEFT"}
BD_PAPER_RANKS = ("bd_2r", "bd_4r", "bd_matched")  # --paper-ranks: BD systems (and their adapter variants)
FIRST_TOKEN_ID = 100  # prompt ids are drawn above the tokenizer's special tokens


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


def random_config_from_flags(args: argparse.Namespace) -> dict:
    """The LlamaConfig fields --hidden, --intermediate, --heads, --kv-heads, --layers and --max-model-len give the
    random base model (resolve_hf_base's `random_config`; its vocabulary and tokenizer are SmolLM2's)."""
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
    if args.model == "smollm2":
        hf_dir = resolve_hf_base(EMBEDDED)
    else:
        hf_dir = resolve_hf_base(EMBEDDED, random_config=random_config_from_flags(args), seed=args.seed)
    return hf_dir, ensure_megatron_base(hf_dir, args.tp)


def adapter_variants(args: argparse.Namespace, hf_config: dict) -> dict:
    """The adapter sets of the run (all seven projections, alpha 2 x rank): variant -> LoRASettings.

    Default: "bd", BD at --adapter-rank with nblocks = TP, served by every mode through exact conversion.
    --paper-ranks: "lora" (plain LoRA at r) and BD at 2r, 4r and LoRA's parameter count at this TP.
    """
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
    prefix = {v: "" if len(variants) == 1 else f"{v}-" for v in variants}
    return {v: [f"{prefix[v]}a{k}" for k in range(num_adapters)] for v in variants}


def write_adapters(root: Path, hf_config: dict, args: argparse.Namespace, variants: dict) -> dict[str, str]:
    """K native checkpoints per variant with random non-zero factors (A unit gain, B std B_STD); name -> directory."""
    out = {}
    for (variant, settings), names in zip(variants.items(), adapter_names(variants, args.num_adapters).values()):
        for k, name in enumerate(names):
            out[name] = write_random_adapter(root / name, hf_config, settings, args.tp, args.seed * 1000 + k)
    return out
