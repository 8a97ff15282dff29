"""What a training job would do, worked out without doing it: `python -m megatron_bdlora.train --dry-run`.

Checks the config as the trainer does, but reads only the base model's config.json (never its weights; when the
model directory is not on this machine, a built-in shape from `param_count` whose name the path contains) and
creates no process group. Reports the model shape, the per-layer sharding plan, adapter parameters (total and
per rank), an estimate of per-rank memory, the collectives of one optimizer step and the global batch layout.
Every number comes from the same code the trainer uses: `ShardingPlan` (via `targets.lora_plan`), the
checkpoint layouts (`checkpoint.hf.layouts`) and `config.batch_layout`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from megatron_bdlora.base_models import EMBEDDED, random_base_config
from megatron_bdlora.checkpoint.base_model import CACHE_NAME, default_cache_dir
from megatron_bdlora.checkpoint.hf import layouts, padded_vocab_size
from megatron_bdlora.config import ALL_TARGETS, LoRASettings
from megatron_bdlora.param_count import BUILTIN_CONFIGS
from megatron_bdlora.rope import llama3_rope_scaling, rope_theta
from megatron_bdlora.sharding import Collective
from megatron_bdlora.targets import cfg_field, check_llama_config, llama_projections, lora_plan
from megatron_bdlora.training.config import BatchLayout, ConfigError, TrainConfig, batch_layout

_BYTES = {"float32": 4, "bfloat16": 2}
ADAM_STATE_BYTES = 8  # AdamW's two fp32 moments per trained parameter
MASTER_BYTES = 4  # DeepSpeed's fp32 master copy (ZeRO >= 1 always; ZeRO-0 with bf16)


def default_world_size(cfg: TrainConfig) -> int:
    """$WORLD_SIZE when set (as under torchrun), else tp x parallel.dp (dp 1 when unset)."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    return cfg.parallel.tp * (cfg.parallel.dp or 1)


def _builtin_shape(name: str) -> str | None:
    """The built-in shape whose name the base model's path contains (e.g. .../Meta-Llama-3.1-8B-Instruct)."""
    lowered = Path(name).name.lower()
    if name == EMBEDDED:
        return "smollm2-135m"
    return next((key for key in BUILTIN_CONFIGS if key in lowered), None)


def base_config(cfg: TrainConfig) -> tuple[dict[str, Any], str]:
    """(HF config, where it came from) of the run's base model, reading config.json only."""
    base = cfg.model.base
    directory = default_cache_dir() if base in (EMBEDDED, CACHE_NAME) else Path(base)
    if (directory / "config.json").is_file():
        hf_config, source = json.loads((directory / "config.json").read_text()), f"{directory}/config.json"
    elif (builtin := _builtin_shape(base)) is not None:
        hf_config = {"model_type": "llama", **BUILTIN_CONFIGS[builtin]}
        source = f"built-in {builtin} shape ({directory}/config.json is not on this machine)"
    else:
        raise ConfigError(
            f"model.base={base!r}: {directory}/config.json does not exist here and the name matches no built-in shape "
            f"({', '.join(BUILTIN_CONFIGS)}); for a dry run, point model.base at a directory holding the base's "
            "config.json"
        )
    if cfg.model.random_config:
        # lazy: transformers' LlamaConfig takes seconds to import and only a random base needs it (the dry run is quick)
        from transformers import LlamaConfig  # fills LlamaConfig's defaults as the trainer's model gets them

        hf_config = LlamaConfig(**random_base_config(hf_config, cfg.model.random_config)).to_dict()
        source += " + model.random_config"
    return hf_config, source


def model_shape(hf_config: dict, tp: int, dtype: str) -> dict[str, Any]:
    """The architecture numbers a reader checks first."""
    heads = cfg_field(hf_config, "num_attention_heads")
    hidden = cfg_field(hf_config, "hidden_size")
    scaling = llama3_rope_scaling(hf_config)
    return dict(
        num_layers=cfg_field(hf_config, "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=cfg_field(hf_config, "num_key_value_heads", heads),
        head_dim=cfg_field(hf_config, "head_dim", hidden // heads),
        intermediate_size=cfg_field(hf_config, "intermediate_size"),
        vocab_size=cfg_field(hf_config, "vocab_size"),
        padded_vocab_size=padded_vocab_size(cfg_field(hf_config, "vocab_size"), tp),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        dtype=dtype,
        rope_theta=rope_theta(hf_config),
        rope_scaling=None if scaling is None else {"rope_type": "llama3", **dataclasses.asdict(scaling)},
    )


def sharding_plan(hf_config: dict, settings: LoRASettings, tp: int) -> list[dict[str, Any]]:
    """One row per target (the same in every layer): what each TP rank holds and which collective it runs."""
    projections = llama_projections(hf_config)
    rows = []
    for target in (t for t in ALL_TARGETS if t in settings.targets):
        plan = lora_plan(hf_config, target, settings, tp)
        rows.append(dict(
            target=target,
            megatron_layer=projections[target].megatron_layer,
            kind=plan.kind.value,
            mode=plan.mode.value,
            d_in=plan.d_in,
            d_out=plan.d_out,
            a_local=list(plan.a.local_shape),
            b_local=list(plan.b.local_shape),
            a_blocks=plan.a.local_blocks,  # packed block-diagonal blocks in this rank's slice (1: dense)
            b_blocks=plan.b.local_blocks,
            replicated=[f for f, shard in (("A", plan.a), ("B", plan.b)) if shard.replicated],
            collective=plan.collective.value,
            rank_in=plan.b.local_shape[1] * plan.b.local_blocks,  # width of the intermediate B consumes
            parameters=plan.num_parameters(),
            parameters_per_rank=math.prod(plan.a.local_shape) + math.prod(plan.b.local_shape),
        ))
    return rows


def base_parameters_per_rank(hf_config: dict, tp: int) -> int:
    """Frozen base weights one TP rank holds (vocabulary padding and replicated norms included)."""
    return sum(math.prod(layout.shard_shape(tp)) for layout in layouts(hf_config, tp))


def activation_bytes(shape: dict, plan: list[dict], layout: BatchLayout) -> int:
    """Bytes autograd saves for backward in one micro-batch (accumulation runs backward per micro-batch), no
    recomputation, megatron's local (unfused) attention. b micro-batch, s sequence, t TP, w bytes of model.dtype,
    h hidden, a query heads, d_h head dim, f ffn, Vp padded vocabulary; per layer, in forward order:

      input_layernorm   w·s·b·(h + 1)            its input and 1/rms
      linear_qkv        w·s·b·(h + Σ r_in)       if adapted: the LoRA input and each target's rank-r_in intermediate
      core attention    w·s·b·3·a·d_h/t          q, k, v (k and v expanded to the query heads)
                        + w·4·s·d_h              RoPE cos and sin, for q and for k
                        + b·(a/t)·s²·(4 + w)     fp32 softmax output and its cast to the dtype (4 + 0 in float32)
      linear_proj       w·s·b·(a·d_h/t + r_in)   if adapted
      pre_mlp_layernorm w·s·b·(h + 1)
      linear_fc1        w·s·b·(h + Σ r_in)       if adapted
      SwiGLU            w·s·b·4f/t               fc1's [gate; up] output (kept by silu's saved gate), silu(gate), up
      linear_fc2        w·s·b·(f/t + r_in)       if adapted
    plus w·s·b·(h + 1) (final norm) + 4·s·b·Vp/t (fp32 softmax of the vocab-parallel cross entropy).
    The frozen base linears save nothing; a frozen op saves nothing either until some adapter upstream needs a
    gradient (in layer 0, what precedes the first adapted layer). Left out, as negligible: the causal mask, loss
    masks and target ids, LoRA scaling scalars; dropout masks (the configs train without dropout).
    """
    w = _BYTES[shape["dtype"]]
    b, s, t = layout.micro_batch_size, layout.seq_length, layout.tp
    h, f, heads = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"]
    attn = heads * shape["head_dim"] // t  # query-head width on this rank
    lora_inputs = {"linear_qkv": h, "linear_proj": attn, "linear_fc1": h, "linear_fc2": f // t}
    lora = {}  # adapted megatron layer -> per-token elements it saves (input + intermediates)
    for row in plan:
        layer = row["megatron_layer"]
        lora[layer] = lora.get(layer, lora_inputs[layer]) + row["rank_in"]
    scores = b * (heads // t) * s * s * (4 + (w if w < 4 else 0))
    norm = w * s * b * (h + 1)
    rope = w * 4 * s * shape["head_dim"]
    ops = [  # (megatron layer if a LoRA op else None, bytes saved), in forward order
        (None, norm), ("linear_qkv", 0), (None, w * s * b * 3 * attn + rope + scores), ("linear_proj", 0),
        (None, norm), ("linear_fc1", 0), (None, w * s * b * 4 * f // t), ("linear_fc2", 0),
    ]
    total, needs_grad = 0, False
    for _ in range(shape["num_layers"]):
        for layer, nbytes in ops:
            if layer is None:
                total += nbytes if needs_grad else 0
            elif layer in lora:
                total += w * s * b * lora[layer]
                needs_grad = True
    return total + norm + 4 * s * b * shape["padded_vocab_size"] // t


def memory_per_rank(shape: dict, plan: list[dict], layout: BatchLayout, zero_stage: int) -> dict[str, int]:
    """Estimated bytes per rank during training; with P adapter parameters on the rank, w bytes per element of
    model.dtype, d = DP size and z = deepspeed.zero_stage:

    - base_weights: the rank's shards of every base tensor x w (frozen: no gradient, no optimizer state)
    - adapter_weights: P x w; adapter_gradients: P x w, / d at ZeRO-2 (gradients partitioned over DP)
    - optimizer_state: (8 AdamW fp32 moments + m fp32 master) x P, / d at ZeRO >= 1 (state partitioned);
      m = 4 at ZeRO >= 1 (DeepSpeed keeps an fp32 partition) or with bf16, else 0
    - activations: `activation_bytes`
    """
    w = _BYTES[shape["dtype"]]
    p_rank = sum(row["parameters_per_rank"] for row in plan) * shape["num_layers"]
    d = layout.dp
    optimizer_shards = d if zero_stage >= 1 else 1
    master = MASTER_BYTES if zero_stage >= 1 or w < 4 else 0
    out = dict(
        base_weights=shape["base_parameters_per_rank"] * w,
        adapter_weights=p_rank * w,
        adapter_gradients=p_rank * w // (d if zero_stage == 2 else 1),
        optimizer_state=math.ceil(p_rank / optimizer_shards) * (ADAM_STATE_BYTES + master),
        activations=activation_bytes(shape, plan, layout),
    )
    out["total"] = sum(out.values())
    return out


def tp_collectives_per_micro_batch(plan: list[dict], num_layers: int, tp: int) -> dict[str, int]:
    """TP collectives of one forward + backward (by kind: all_reduce, all_gather, reduce_scatter).

    Base (no sequence parallelism): forward all-reduces after the embedding and each row layer (proj, fc2) and 3 in
    the vocab-parallel cross entropy; backward one all-reduce of the input gradient of every column layer whose
    input needs a gradient (all but layer 0's qkv, and layer 0's fc1 too when no attention projection is adapted:
    embeddings are frozen) and of the output layer. LoRA: per adapted megatron layer, the plan's collective
    forward and its adjoint backward (S-LoRA: all-gather / reduce-scatter for column, all-reduce both ways for
    row layers), and one backward all-reduce per TP-replicated factor.
    """
    counts = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
    if tp == 1:
        return counts
    attention_adapted = any(row["megatron_layer"] in ("linear_qkv", "linear_proj") for row in plan)
    column_backward = 2 * num_layers - 1 - (0 if attention_adapted else 1)
    counts["all_reduce"] += 1 + 2 * num_layers + 3 + column_backward + 1
    per_layer = {}
    for row in plan:  # one collective per fused megatron layer (its sub-projections share it)
        per_layer[row["megatron_layer"]] = row["collective"]
        counts["all_reduce"] += num_layers * len(row["replicated"])
    for collective in per_layer.values():
        if collective == Collective.ALL_GATHER.value:
            counts["all_gather"] += num_layers
            counts["reduce_scatter"] += num_layers
        elif collective == Collective.ALL_REDUCE.value:
            counts["all_reduce"] += 2 * num_layers
    return counts


def step_collectives(layout: BatchLayout, zero_stage: int, grad_clip: float) -> dict[str, dict[str, int]]:
    """Collectives of one step outside the model's forward/backward, before DeepSpeed splits them into buckets.

    data_parallel: the trainer's sums of loss tokens, loss and input tokens (3 all-reduces, also on a group of
    one); the adapter gradients reduced over DP once per step (ZeRO 0 and 1) or after every micro-batch (ZeRO 2),
    which DeepSpeed runs as all-reduces or as reduces to each partition's owner; and at ZeRO >= 1 the updated
    partitions all-gathered. gradient_norm: with optimizer.grad_clip > 0, the TP-aware norm for clipping is
    all-reduced over the TP group and over the DP group (where they have more than one rank).
    """
    dp = layout.dp > 1
    data_parallel = {"all_reduce": 3, "gradient_reduce": 0, "all_gather": 0}
    if dp:
        data_parallel["gradient_reduce"] = layout.grad_accum if zero_stage == 2 else 1
        data_parallel["all_gather"] = 1 if zero_stage >= 1 else 0
    norm = int(layout.tp > 1) + int(dp) if grad_clip > 0 else 0
    return {"data_parallel": data_parallel, "gradient_norm": {"all_reduce": norm}}


def dry_run(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The whole report as plain data (JSON-ready); ConfigError / ValueError for what the real run would reject."""
    layout = batch_layout(cfg, world_size)
    hf_config, source = base_config(cfg)
    settings = cfg.lora.settings(cfg.seed)
    try:
        check_llama_config(hf_config, layout.tp)  # what the model builder checks, RoPE included
        plan = sharding_plan(hf_config, settings, layout.tp)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    shape = model_shape(hf_config, layout.tp, cfg.model.dtype)
    shape["base_parameters_per_rank"] = base_parameters_per_rank(hf_config, layout.tp)
    layers = shape["num_layers"]
    tp_micro = tp_collectives_per_micro_batch(plan, layers, layout.tp)
    lora = dict(mode=settings.mode.value, rank=settings.rank, alpha=settings.alpha,
                nblocks=settings.nblocks_for(layout.tp), targets=list(settings.targets), scaling=settings.scaling)
    return dict(
        config_source=source,
        model=shape,
        lora=lora,
        sharding_plan=plan,
        adapter_parameters=dict(
            total=layers * sum(row["parameters"] for row in plan),
            per_rank=layers * sum(row["parameters_per_rank"] for row in plan),
        ),
        zero_stage=cfg.deepspeed.zero_stage,
        memory_bytes_per_rank=memory_per_rank(shape, plan, layout, cfg.deepspeed.zero_stage),
        collectives_per_step=dict(
            tensor_parallel={k: v * layout.grad_accum for k, v in tp_micro.items()},
            tensor_parallel_per_micro_batch=tp_micro,
            **step_collectives(layout, cfg.deepspeed.zero_stage, cfg.optimizer.grad_clip),
        ),
        batch=dict(dataclasses.asdict(layout), tokens_per_step=layout.tokens_per_step),
        data={key: dict(path=path, exists=Path(path).is_file())
              for key, path in (("train", cfg.data.train), ("valid", cfg.data.valid)) if path is not None},
    )


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:9.2f} {unit}"
    return f"{n:9d} B"


def format_report(r: dict[str, Any]) -> str:
    """The report as text for a person checking a job before submitting it."""
    m, b, lora = r["model"], r["batch"], r["lora"]
    rope = (f", llama3 scaling x{m['rope_scaling']['factor']:g} (low/high freq factors "
            f"{m['rope_scaling']['low_freq_factor']:g}/{m['rope_scaling']['high_freq_factor']:g}, original context "
            f"{m['rope_scaling']['original_max_position_embeddings']})" if m["rope_scaling"] else "")
    lines = [
        f"model      {r['config_source']}",
        f"           {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads / "
        f"{m['num_key_value_heads']} KV heads of {m['head_dim']}, ffn {m['intermediate_size']}, "
        f"vocab {m['vocab_size']} (padded {m['padded_vocab_size']}), "
        f"{'tied' if m['tie_word_embeddings'] else 'untied'} embeddings, {m['dtype']}",
        f"           RoPE theta {m['rope_theta']:g}{rope}",
        f"parallel   world {b['world_size']} = TP {b['tp']} x DP {b['dp']}, DeepSpeed ZeRO-{r['zero_stage']}",
        f"batch      micro {b['micro_batch_size']} x accumulation {b['grad_accum']} x DP {b['dp']} = global "
        f"{b['global_batch_size']} sequences x {b['seq_length']} tokens = {b['tokens_per_step']:,} tokens per step",
        f"adapter    {lora['mode']} rank {lora['rank']} alpha {lora['alpha']:g}"
        + (f" nblocks {lora['nblocks']}" if lora["nblocks"] else "") + f" on {','.join(lora['targets'])}",
        f"           {r['adapter_parameters']['total']:,} parameters in total, "
        f"{r['adapter_parameters']['per_rank']:,} per rank",
        "sharding plan (every layer; A: r x d_in, B: d_out x r; shapes on one TP rank, packed blocks in [])",
        f"  {'target':<10}{'megatron':<13}{'kind':<8}{'mode':<16}{'A local':<16}{'B local':<16}{'replicated':<12}"
        "collective",
    ]
    for row in r["sharding_plan"]:
        a = f"{tuple(row['a_local'])}" + (f"[{row['a_blocks']}]" if row["a_blocks"] > 1 else "")
        bl = f"{tuple(row['b_local'])}" + (f"[{row['b_blocks']}]" if row["b_blocks"] > 1 else "")
        lines.append(f"  {row['target']:<10}{row['megatron_layer']:<13}{row['kind']:<8}{row['mode']:<16}{a:<16}{bl:<16}"
                     f"{','.join(row['replicated']) or '-':<12}{row['collective']}")
    mem = r["memory_bytes_per_rank"]
    lines.append("memory per rank (estimate: one micro-batch in flight, no recomputation, unfused attention; "
                 "formulas in megatron_bdlora/training/dry_run.py)")
    for key in ("base_weights", "adapter_weights", "adapter_gradients", "optimizer_state", "activations", "total"):
        lines.append(f"  {key.replace('_', ' '):<20}{_size(mem[key])}")
    c = r["collectives_per_step"]
    lines.append(f"collectives per step ({b['grad_accum']} micro-batches per DP rank)")
    for group, label in (("tensor_parallel", "model (TP group)"),
                         ("tensor_parallel_per_micro_batch", "  per micro-batch"),
                         ("data_parallel", "data parallel"), ("gradient_norm", "clipping norm")):
        kinds = ", ".join(f"{v} {k}" for k, v in c[group].items() if v) or "none"
        lines.append(f"  {label:<20}{kinds}")
    for key, d in r["data"].items():
        if not d["exists"]:
            lines.append(f"note: data.{key} {d['path']} is not on this machine")
    return "\n".join(lines)
