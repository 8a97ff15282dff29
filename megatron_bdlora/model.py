"""Llama-architecture megatron-core GPTModel built from a Hugging Face config, LoRA on any of the seven projections.

Megatron's local layer spec (no transformer-engine): RMSNorm, SwiGLU with [gate; up] fused in `linear_fc1`,
RoPE (rotate-half, the config's theta, Llama-3.1 frequency scaling), grouped-query attention.

Fused layouts and where each HF projection's adapter sits (TP degree N, rank i, G = KV heads):
- linear_qkv [(q + 2 kv) / N, h]: rank i holds query groups i*G/N .. (i+1)*G/N; per group g its H/G q heads,
  then k head g, then v head g. q_proj/k_proj/v_proj keep separate adapters; each adapter's rank-i output
  slice is exactly the heads of rank i's groups, so a block-diagonal B (nblocks a multiple of N) lines up
  with the shard. The three outputs are interleaved per query group into the fused layout.
- linear_fc1 [2 ffn / N, h]: rank i holds [gate rows chunk i | up rows chunk i]; gate_proj and up_proj
  keep separate adapters, concatenated per rank.
- linear_proj (o_proj) and linear_fc2 (down_proj): row-parallel, one adapter each.
TP must divide the KV heads: otherwise heads would be replicated and block structures would not line up.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_bdlora.checkpoint.hf import padded_vocab_size
from megatron_bdlora.config import FUSED_LAYERS, LoRASettings
from megatron_bdlora.layers import LoRAColumnParallelLinear, LoRALayerSpec, LoRAParallelLinear, LoRARowParallelLinear
from megatron_bdlora.rope import Llama3RopeScaling, llama3_rope_scaling, rope_theta
from megatron_bdlora.sharding import LayerKind
from megatron_bdlora.targets import check_llama_config, llama_projections

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _apply_llama3_rope_scaling(model: GPTModel, scaling: Llama3RopeScaling) -> None:
    """Scale the model's RoPE frequencies with megatron's own llama3 formula, every field from the config.

    megatron's formula is transformers' `_compute_llama3_parameters` line for line, but its constructor
    (`rope_scaling=True`) passes only `factor` and keeps low_freq_factor=1, high_freq_factor=4 and
    original_max_position_embeddings=8192 fixed; calling `_apply_scaling` with all four matches transformers
    for any llama3 config (Llama-3.1's own values give the constructor's result).
    """
    rope = model.rotary_pos_emb
    rope.inv_freq = rope._apply_scaling(rope.inv_freq, **dataclasses.asdict(scaling))  # [head_dim / 2]


def transformer_config(
    hf_config: dict, tp: int, dtype: str = "float32", cuda_graphs: bool = False
) -> TransformerConfig:
    """megatron TransformerConfig equivalent to an HF LlamaConfig (dropout off, no fusions needing CUDA).

    cuda_graphs: megatron's own ("local") CUDA graphs, one per transformer layer and decode batch size, which its
    dynamic inference engine captures at start-up (serving on a GPU only).
    """
    check_llama_config(hf_config, tp)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} not supported; expected one of {list(_DTYPES)}")
    heads = hf_config["num_attention_heads"]
    return TransformerConfig(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        kv_channels=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        ffn_hidden_size=hf_config["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        tensor_model_parallel_size=tp,
        sequence_parallel=False,
        use_cpu_initialization=True,
        perform_initialization=False,  # weights come from a checkpoint
        params_dtype=_DTYPES[dtype],
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        attention_dropout=0.0,
        hidden_dropout=0.0,
        attention_softmax_in_fp32=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cuda_graph_impl="local" if cuda_graphs else "none",
    )


def _layer_spec(hf_config: dict, lora: LoRASettings | None, slots: int = 1) -> ModuleSpec:
    """megatron's local GPT layer spec with LoRA layers swapped in where a target lives."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if lora is None:
        return spec
    projections = llama_projections(hf_config)
    groups = {"linear_qkv": hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]}
    for layer in FUSED_LAYERS:
        if not set(layer.projections) & set(lora.targets):
            continue
        cls = LoRAColumnParallelLinear if layer.kind is LayerKind.COLUMN else LoRARowParallelLinear
        lspec = LoRALayerSpec(
            settings=lora,
            projections=tuple((n, projections[n].d_out) for n in layer.projections),
            groups=groups.get(layer.name),
            layer_name=layer.name,
            slots=slots,
        )
        holder = getattr(spec.submodules, layer.megatron_module).submodules
        setattr(holder, layer.name, ModuleSpec(module=cls, params={"lora": lspec}))
    return spec


def build_model(
    hf_config: dict,
    tp: int,
    lora: LoRASettings | None = None,
    dtype: str = "float32",
    slots: int = 1,
    cuda_graphs: bool = False,
) -> GPTModel:
    """The TP-sharded model of this rank (weights uninitialised: load a checkpoint next).

    slots > 1 gives every LoRA layer that many adapter slots (serving: one per device-resident adapter);
    cuda_graphs: layers captured in megatron's CUDA graphs by the serving engine (see transformer_config).
    """
    config = transformer_config(hf_config, tp, dtype, cuda_graphs)
    if cuda_graphs:  # each layer's graph manager, made with the layer, asserts megatron's graph-safe RNG tracker
        # the seed only feeds dropout, which is off in these models
        tensor_parallel.model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True, force_reset_rng=True)
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(hf_config, lora, slots),
        vocab_size=padded_vocab_size(hf_config["vocab_size"], tp),
        max_sequence_length=hf_config.get("max_position_embeddings", 4096),
        parallel_output=True,
        share_embeddings_and_output_weights=bool(hf_config.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope_theta(hf_config),
    )
    scaling = llama3_rope_scaling(hf_config)
    if scaling is not None:
        _apply_llama3_rope_scaling(model, scaling)
    model.hf_config = hf_config
    if lora is not None:  # fine-tuning trains the adapter only: embeddings, norms and base weights stay frozen
        for name, param in model.named_parameters():
            param.requires_grad_(".lora." in name)
    for l_idx, layer in enumerate(model.decoder.layers):
        for module in layer.modules():
            if isinstance(module, LoRAParallelLinear):
                module.reset_lora_parameters(f"layers.{l_idx}.{module.lora_spec.layer_name}")
    return model


def lora_layers(model: GPTModel) -> dict[tuple[int, str], tuple[LoRAParallelLinear, str]]:
    """(layer index, HF projection) -> (the parallel layer carrying it, projection name)."""
    out = {}
    for l_idx, layer in enumerate(model.decoder.layers):
        for module in layer.modules():
            if isinstance(module, LoRAParallelLinear):
                for proj in module.lora:
                    out[(l_idx, proj)] = (module, proj)
    return out


def adapter_state_dict(
    model: GPTModel, slot: int = 0, value: Callable[[torch.nn.Parameter], torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """This rank's adapter shards under the native checkpoint keys `layers.{l}.{proj}.lora_A|B`; with `value`, that
    of each factor parameter instead (its gradient, an optimizer moment), every rank walking them in one order."""
    state = {}
    for (l_idx, proj), (module, name) in lora_layers(model).items():
        ad = module.lora[name]
        for factor, param in (("A", ad.lora_A), ("B", ad.lora_B)):
            tensor = param if value is None else value(param)
            state[f"layers.{l_idx}.{proj}.lora_{factor}"] = tensor[slot].detach().clone()
    return state


@torch.no_grad()
def load_adapter_state_dict(
    model: GPTModel, state: dict[str, torch.Tensor], slot: int = 0, scaling: float | None = None
) -> None:
    """Load this rank's shards (native keys) into a slot; every key must match a LoRA layer exactly."""
    layers = lora_layers(model)
    expected = {f"layers.{l_idx}.{p}.lora_{f}" for (l_idx, p) in layers for f in "AB"}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"adapter keys do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for (l_idx, proj), (module, name) in layers.items():
        ad = module.lora[name]
        for f, param in (("A", ad.lora_A), ("B", ad.lora_B)):
            key = f"layers.{l_idx}.{proj}.lora_{f}"
            if tuple(state[key].shape) != tuple(param.shape[1:]):
                raise ValueError(
                    f"adapter tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape[1:])}"
                )
            param[slot] = state[key].to(param.dtype)
        if scaling is not None:
            ad.scaling[slot] = scaling


@torch.no_grad()
def load_base_state_dict(model: GPTModel, state: dict[str, torch.Tensor]) -> None:
    """Load this rank's base shards; everything but LoRA parameters must be present with its exact shape."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state") and ".lora." not in k}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"base checkpoint does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"base tensor {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        own[k].copy_(v)


def causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """megatron's boolean mask [b, 1, s, s] (True = hidden) from an HF padding mask [b, s] (1 = token)."""
    b, s = attention_mask.shape
    future = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)  # [s, s]
    pad = ~attention_mask.bool()[:, None, None, :]  # [b, 1, 1, s]
    return future[None, None] | pad


def forward_logits(
    model: GPTModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V] (gathered over TP, vocab padding dropped); left padding is exact."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)  # RoPE is relative: exact
    logits = model(input_ids, position_ids, causal_mask(attention_mask), runtime_gather_output=True)
    return logits[..., : model.hf_config["vocab_size"]]


@torch.no_grad()
def load_full_adapter(
    model: GPTModel,
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    slot: int = 0,
    scaling: float | None = None,
) -> None:
    """Load full stored factors {(layer, proj): (A, B)} (PEFT layout); each rank keeps its slices."""
    layers = lora_layers(model)
    if set(factors) != set(layers):
        missing, extra = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
        raise ValueError(
            f"adapter does not match the model's LoRA layers: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for key, (module, name) in layers.items():
        try:
            module.lora[name].load_full_factors(*factors[key], slot=slot, scaling=scaling)
        except ValueError as err:
            raise ValueError(f"adapter factor of layer {key[0]} {key[1]}: {err}") from None
