"""The megatron Llama model vs transformers (+ PEFT) on a small random GQA config at TP 1, 2 and 4."""

from __future__ import annotations

import pytest
import torch

from megatron_bdlora.config import LoRASettings
from megatron_bdlora.local_ranks import run_distributed
from peft_reference import RANDOM_LLAMA, make_random_llama, peft_model, random_factors

def _settings(mode: str) -> list[LoRASettings]:
    """The adapters checked per mode: all seven targets, and a subset leaving fused siblings un-adapted."""
    nblocks = 4 if mode == "block_diagonal" else None
    return [
        LoRASettings(rank=8, alpha=16, mode=mode, nblocks=nblocks),
        LoRASettings(rank=4, alpha=8, use_rslora=True, mode=mode, nblocks=nblocks, targets=("k_proj", "up_proj", "o_proj")),
    ]


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model, ids, mask = make_random_llama(root, (1, 2, 4))
    return root, model, ids, mask


def model_logits_worker(info, meg_dir, adapters, ids, mask):
    """Base logits, then logits with each adapter (full factors loaded, each rank keeps its slices)."""
    from megatron_bdlora.checkpoint.hf import load_megatron_rank_state
    from megatron_bdlora.model import build_model, forward_logits, load_base_state_dict, load_full_adapter
    import json

    hf_config = json.loads((meg_dir / "config.json").read_text())
    base_state = load_megatron_rank_state(meg_dir, info.tp_rank)
    out = []
    for settings, factors in [(None, None)] + adapters:
        model = build_model(hf_config, info.tp_size, settings)
        load_base_state_dict(model, base_state)
        if settings is not None:
            load_full_adapter(model, factors)
        model.eval()
        with torch.no_grad():
            out.append(forward_logits(model, ids, mask))
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logits_match_transformers_and_peft(random_llama, tp):
    root, hf_model, ids, mask = random_llama
    adapters = [(s, random_factors(RANDOM_LLAMA, s, seed=i)) for i, s in enumerate(
        s for mode in ("block_diagonal", "slora", "replicated") for s in _settings(mode))]
    results = run_distributed(model_logits_worker, tp, root / f"meg_tp{tp}", adapters, ids, mask)
    keep = mask.bool()
    with torch.no_grad():
        want_base = hf_model(input_ids=ids, attention_mask=mask).logits
    for rank_out in results:
        base = rank_out[0]
        assert (base - want_base)[keep].abs().max() <= 1e-3
        for (settings, factors), got in zip(adapters, rank_out[1:]):
            import copy

            ref = peft_model(copy.deepcopy(hf_model), settings, factors)
            with torch.no_grad():
                want = ref(input_ids=ids, attention_mask=mask).logits
            moved = (want - want_base)[keep].abs().max()
            assert moved > 1e-2, "the adapter must change the logits for the check to mean anything"
            err = (got - want)[keep].abs().max()
            assert err <= 1e-3, f"{settings.mode.value} {settings.targets}: max abs diff {err}"


def trainable_worker(info, meg_dir):
    import json

    from megatron_bdlora.model import build_model

    hf_config = json.loads((meg_dir / "config.json").read_text())
    model = build_model(hf_config, info.tp_size, LoRASettings(rank=4, alpha=8, mode="block_diagonal", nblocks=2))
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


def test_only_adapter_parameters_are_trainable(random_llama):
    root = random_llama[0]
    names = run_distributed(trainable_worker, 2, root / "meg_tp2")[0]
    # 2 layers x 7 projections x (A, B): embeddings, norms, output layer and base weights are frozen
    assert len(names) == 2 * 7 * 2 and all(".lora." in n for n in names), names
