"""Parity on the real pretrained SmolLM2-135M-Instruct (9 heads, 3 KV heads) at TP=3: logits and greedy
generation vs transformers, and logits with a random adapter in each mode vs transformers + PEFT. (TP=1 runs the
same code unsharded; it is checked on random Llamas in test_model.py, which keeps the suite within budget.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft_reference import peft_model, random_factors

from megatron_bdlora.config import LoRASettings
from megatron_bdlora.local_ranks import run_distributed

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
]
ADAPTERS = [
    LoRASettings(rank=6, alpha=12, mode="block_diagonal", nblocks=3),
    LoRASettings(rank=6, alpha=12, mode="slora"),
    LoRASettings(rank=4, alpha=8, mode="replicated", use_rslora=True),
]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megatron_bdlora.base_models import ensure_megatron_base, resolve_hf_base

    hf_dir = resolve_hf_base("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    chats = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for p in PROMPTS
    ]
    megatron_dirs = {tp: ensure_megatron_base(hf_dir, tp) for tp in (3,)}
    return hf_dir, tok, model, [list(c) for c in chats], megatron_dirs


def _batch(chats: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(c) for c in chats)
    ids = torch.tensor([[pad] * (n - len(c)) + c for c in chats])
    mask = torch.tensor([[0] * (n - len(c)) + [1] * len(c) for c in chats])
    return ids, mask


def smollm2_worker(info, meg_dir, chats, pad, adapters, new_tokens):
    from megatron_bdlora.checkpoint.hf import load_megatron_rank_state
    from megatron_bdlora.generate import greedy_generate, load_adapter_for_model
    from megatron_bdlora.model import build_model, forward_logits, load_base_state_dict, load_full_adapter

    hf_config = json.loads((meg_dir / "config.json").read_text())
    state = load_megatron_rank_state(meg_dir, info.tp_rank, info.tp_size)
    ids, mask = _batch(chats, pad)
    out = {"adapters": []}
    for settings, factors in [(None, None)] + adapters:
        if isinstance(factors, Path):  # a PEFT adapter directory, imported for this TP
            settings, load = load_adapter_for_model(factors, hf_config, info.tp_size, info.tp_rank)
        model = build_model(hf_config, info.tp_size, settings)
        load_base_state_dict(model, state)
        if isinstance(factors, Path):
            load(model)
        elif factors is not None:
            load_full_adapter(model, factors)
        model.eval()
        with torch.no_grad():
            logits = forward_logits(model, ids, mask)
        if settings is None:
            out["base"] = logits
            # the three prompts decoded as one left-padded batch (full recompute per token)
            out["generated"] = greedy_generate(model, chats[:3], new_tokens, eos_ids=set(), pad_id=pad)
        else:
            out["adapters"].append(logits)
        del model
    return out


@pytest.mark.parametrize("tp", [3])
def test_smollm2_logits_generation_and_adapters_match_transformers(smollm2, tp, tmp_path):
    from transformers import GenerationConfig

    hf_dir, tok, hf_model, chats, megatron_dirs = smollm2
    hf_config = json.loads((hf_dir / "config.json").read_text())
    adapters = [(s, random_factors(hf_config, s, seed=10 + i, scale=0.03)) for i, s in enumerate(ADAPTERS)]
    refs = [peft_model(copy.deepcopy(hf_model), s, f) for s, f in adapters]
    # the BD adapter goes through a directory written by PEFT itself (use_bdlora, nblocks=3, packed factors)
    refs[0].save_pretrained(tmp_path / "peft_bd")
    sent = [(None, tmp_path / "peft_bd")] + adapters[1:]
    results = run_distributed(smollm2_worker, tp, megatron_dirs[tp], chats, tok.pad_token_id, sent, 20)
    ids, mask = _batch(chats, tok.pad_token_id)
    keep = mask.bool()
    with torch.no_grad():
        want = hf_model(input_ids=ids, attention_mask=mask).logits
        # transformers' own greedy decoding (stops at EOS) and a 20-token argmax loop over its forward
        gen = GenerationConfig(do_sample=False, max_new_tokens=20, pad_token_id=tok.pad_token_id)
        hf_generate = [
            hf_model.generate(
                torch.tensor([c]), attention_mask=torch.ones(1, len(c), dtype=torch.long), generation_config=gen
            )[0, len(c) :].tolist()
            for c in chats[:3]
        ]
        want_gen = []
        for c in chats[:3]:
            seq = list(c)
            for _ in range(20):
                seq.append(int(hf_model(torch.tensor([seq])).logits[0, -1].argmax()))
            want_gen.append(seq[len(c):])
    res = results[0]
    err = (res["base"] - want)[keep].abs().max().item()
    assert err <= 1e-3, f"tp={tp}: base logits max abs diff {err}"
    assert res["generated"] == want_gen, f"tp={tp}: greedy tokens differ:\n{res['generated']}\n{want_gen}"
    for ours, theirs in zip(res["generated"], hf_generate):
        stop = ours.index(tok.eos_token_id) + 1 if tok.eos_token_id in ours else len(ours)
        assert ours[:stop] == theirs, f"tp={tp}: differs from transformers.generate: {ours[:stop]} vs {theirs}"
    assert "Paris" in tok.decode(res["generated"][0])
    for (settings, _), ref, got in zip(adapters, refs, res["adapters"]):
        with torch.no_grad():
            want_lora = ref(input_ids=ids, attention_mask=mask).logits
        assert (want_lora - want)[keep].abs().max() > 1e-2, "adapter too small to test anything"
        err = (got - want_lora)[keep].abs().max().item()
        assert err <= 1e-3, f"tp={tp} {settings.mode.value}: logits max abs diff {err}"
    for other in results[1:]:
        assert other["generated"] == res["generated"]
