"""The transformers + PEFT reference the trainer and the models are checked against (tests and the GPU check).

`peft_model` puts exactly a given adapter (full stored factors, PEFT layout) on a Hugging Face Llama, as a BD-LoRA
(`use_bdlora`) or plain LoRA model; `mean_token_loss_gradients` is the float64 gradient of a global batch's mean
token loss with respect to every factor, the quantity the trainer's accumulated gradients must equal whatever its
TP / DP / accumulation split (tests/test_train_gradients.py, megatron_bdlora/bench/gpu_training.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_bdlora.config import COLUMN_TARGETS, ROW_TARGETS, LoRASettings
from megatron_bdlora.targets import llama_projections

Factors = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, projection) -> full stored (A, B)


def peft_model(hf_model: torch.nn.Module, settings: LoRASettings, factors: Factors) -> torch.nn.Module:
    """transformers + PEFT with exactly these factors (BD config when the settings are block-diagonal)."""
    # lazy: peft takes seconds to import (it pulls in transformers' models) and only the reference needs it
    from peft import BdLoraConfig, LoraConfig, get_peft_model, set_peft_model_state_dict

    kwargs = {}
    if settings.mode.value == "block_diagonal":
        kwargs["use_bdlora"] = BdLoraConfig(
            target_modules_bd_a=[t for t in ROW_TARGETS if t in settings.targets],
            target_modules_bd_b=[t for t in COLUMN_TARGETS if t in settings.targets],
            nblocks=settings.nblocks,
        )
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        use_rslora=settings.use_rslora,
        target_modules=list(settings.targets),
        lora_dropout=0.0,
        **kwargs,
    )
    model = get_peft_model(hf_model, config)
    modules = {p.name: p.hf_module for p in llama_projections(hf_model.config).values()}
    state = {}
    for (layer, proj), (a, b) in factors.items():
        prefix = f"base_model.model.model.layers.{layer}.{modules[proj]}.{proj}"
        state[f"{prefix}.lora_A.weight"] = a
        state[f"{prefix}.lora_B.weight"] = b
    result = set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys, result.unexpected_keys
    return model.eval()


def mean_token_loss_gradients(
    hf_model: torch.nn.Module, settings: LoRASettings, factors: Factors, batch: dict[str, torch.Tensor]
) -> tuple[Factors, float]:
    """(gradient of every factor, loss) of the mean cross-entropy over the batch's loss tokens, in the dtype and on
    the device of `hf_model` (float64 for a reference), with the adapter `factors` put on it by `peft_model`.

    batch: the trainer's collated global batch (`input_ids`, `labels`, `loss_mask`, each [b, s]; labels[t] is the
    token after input_ids[t], loss_mask[t] whether it counts). The model is changed (the adapter is added).
    """
    device = next(hf_model.parameters()).device
    model = peft_model(hf_model, settings, factors)
    logits = model(input_ids=batch["input_ids"].to(device)).logits
    per_token = F.cross_entropy(logits.flatten(0, 1), batch["labels"].to(device).flatten(), reduction="none")
    mask = batch["loss_mask"].to(device, logits.dtype).flatten()
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    params = dict(model.named_parameters())
    modules = {p.name: p.hf_module for p in llama_projections(hf_model.config).values()}
    grads = {}
    for layer, proj in factors:
        prefix = f"base_model.model.model.layers.{layer}.{modules[proj]}.{proj}"
        grads[(layer, proj)] = tuple(params[f"{prefix}.lora_{f}.default.weight"].grad for f in "AB")
    return grads, loss.item()
