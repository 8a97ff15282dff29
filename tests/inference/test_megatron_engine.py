"""megatron-core's dynamic engine on our model (CPU fallbacks) gives the greedy tokens of a full recompute.

The reference is `forward_logits` on prompt + generated tokens (no KV cache, the model's own attention):
the engine's tokens must be exactly its argmax at every position. Requests join a running batch, long
prompts are prefilled in chunks, a tiny KV buffer forces pausing and eviction; TP 1 in-process, TP 2 spawned.
"""

from __future__ import annotations

import pytest
import torch

from megatron_bdlora.local_ranks import run_distributed

TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=251,  # odd: TP 2 pads the vocabulary by one row
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
NEW_TOKENS = 12
BLOCK = 4  # tokens per KV block: small, so that requests cross many blocks


def word_tokenizer():
    """A real HF tokenizer over the tiny vocabulary: "t5 t6" <-> [5, 6], EOS "</s>" = 250."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(TINY_LLAMA["vocab_size"] - 1)} | {"</s>": TINY_LLAMA["vocab_size"] - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def random_tiny_llama(info):
    """This rank's shard with seeded random weights; vocabulary padding rows large, so sampling them would show."""
    from megatron_bdlora.model import build_model

    model = build_model(TINY_LLAMA, info.tp_size)
    g = torch.Generator().manual_seed(1000 + info.tp_rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.fill_(1.0)
            elif "embedding" in name:
                param.copy_(torch.randn(param.shape, generator=g))
            else:
                param.copy_(torch.randn(param.shape, generator=g) / param.shape[-1] ** 0.5)
        rows = model.output_layer.weight  # [Vp / TP, h]
        padding = rows.shape[0] * info.tp_size - TINY_LLAMA["vocab_size"]
        if padding and info.tp_rank == info.tp_size - 1:
            rows[-padding:] = 5 * torch.randn(padding, rows.shape[1], generator=g)
    return model.eval()


def kv_buffer_gb(info, blocks: int) -> float:
    """buffer_size_gb holding exactly `blocks` KV blocks on this rank (fp32; the +0.5 absorbs float rounding)."""
    c = TINY_LLAMA
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    block_bytes = 4 * 2 * c["num_hidden_layers"] * BLOCK * (c["num_key_value_heads"] // info.tp_size) * head_dim
    return (blocks + 0.5) * block_bytes / 1024**3


def engine_for(model, **overrides):
    from megatron_bdlora.inference.megatron_engine import build_dynamic_engine

    kwargs = dict(
        max_sequence_length=128,
        max_requests=4,
        max_tokens=64,
        buffer_size_gb=0.01,
        block_size_tokens=BLOCK,
        params_dtype=torch.float32,
    )
    engine = build_dynamic_engine(model, word_tokenizer(), **(kwargs | overrides))
    poison_unwritten_kv(engine)
    return engine


def poison_unwritten_kv(engine) -> None:
    """NaN in every KV slot not written yet (megatron allocates it with torch.empty): reading one must not matter."""
    engine.context.memory_buffer.fill_(float("nan"))


def run_engine(engine, prompts: dict, arrivals: dict, suspend_at: int | None = None) -> tuple[dict, dict]:
    """Step until every request finished, adding request r before step arrivals[r] (as text when a str).

    Returns the generated tokens per request, and what was seen: chunked prefill, the most requests paused
    after a step, the evictions counted by the engine, each request's event types.
    """
    from megatron.core.inference.sampling_params import SamplingParams

    tokens, seen = {}, {"chunked": False, "max_paused": 0, "events": {}}
    for step in range(200):
        for rid in (r for r, at in arrivals.items() if at == step):
            engine.add_request(
                rid, prompts[rid], SamplingParams(top_k=1, num_tokens_to_generate=NEW_TOKENS, termination_id=-1)
            )
        if step == suspend_at:
            engine.suspend()
            engine.resume()  # every request is re-added with prompt + tokens so far
            # megatron 0.16.1 leaves the controller's termination_id metadata aliasing the context tensor that
            # suspend() dropped (stale: 0 in slots unused before, so a request sampling token 0 there would end);
            # re-binding it is what megatron's static engine does
            engine.controller._init_dynamic_sampling_tensors()
            poison_unwritten_kv(engine)  # resume() allocated a new buffer
        result = engine.step_modern()
        seen["chunked"] |= engine.context.chunked_prefill_request_id != -1
        seen["max_paused"] = max(seen["max_paused"], engine.context.paused_request_count)
        for record in result["finished_request_records"]:
            merged = record.merge()
            tokens[merged.request_id] = merged.generated_tokens
            seen["events"][merged.request_id] = [e.type.name for e in merged.events]
        if len(tokens) == len(prompts):
            seen["evicted"] = engine.evicted_request_count
            return tokens, seen
    raise AssertionError(f"requests {sorted(set(prompts) - set(tokens))} did not finish in 200 steps")


@torch.no_grad()
def full_recompute_greedy(model, prompt_ids: list[int], generated: list[int]) -> list[int]:
    """Greedy next token after prompt + generated[:j] for every j, from one forward without KV cache."""
    from megatron_bdlora.model import forward_logits

    logits = forward_logits(model, torch.tensor([prompt_ids + generated]))  # [1, s, V]
    return logits[0, len(prompt_ids) - 1 : -1].argmax(-1).tolist()


def prompt_ids(prompt) -> list[int]:
    return [int(word[1:]) for word in prompt.split()] if isinstance(prompt, str) else prompt


# lengths 5, 11, 70 (> max_tokens=64: prefilled in two chunks), 3 (given as text); 2 and 3 join while others decode
JOINING_PROMPTS = {
    0: list(range(5, 10)),
    1: list(range(20, 31)),
    2: [(7 * i) % 250 for i in range(70)],
    3: "t3 t4 t5",
}
JOINING_ARRIVALS = {0: 0, 1: 0, 2: 2, 3: 4}
# 6 + 9 + 5 + 7 prompt tokens + 4 x 12 new ones need 25 blocks of 4; the buffer has 13 (3 kept for paused requests)
PRESSURE_PROMPTS = {0: list(range(1, 7)), 1: list(range(7, 16)), 2: list(range(16, 21)), 3: list(range(21, 28))}
PRESSURE_ARRIVALS = {0: 0, 1: 0, 2: 1, 3: 3}


def joining_and_pressure_worker(info):
    """Both scenarios on one rank: tokens and full-recompute references, what was seen, padding sampled raw."""
    from megatron_bdlora.model import causal_mask

    model = random_tiny_llama(info)
    joining = run_engine(engine_for(model), JOINING_PROMPTS, JOINING_ARRIVALS)
    small = engine_for(model, buffer_size_gb=kv_buffer_gb(info, 14), paused_buffer_size_gb=kv_buffer_gb(info, 3))
    pressure = run_engine(small, PRESSURE_PROMPTS, PRESSURE_ARRIVALS)
    refs = {
        name: {r: full_recompute_greedy(model, prompt_ids(prompts[r]), toks) for r, toks in run[0].items()}
        for name, prompts, run in (("joining", JOINING_PROMPTS, joining), ("pressure", PRESSURE_PROMPTS, pressure))
    }
    ids = torch.tensor([JOINING_PROMPTS[2]])
    with torch.no_grad():  # argmax over the padded vocabulary: how often an unstripped engine would pick padding
        raw = model(
            ids, torch.arange(ids.shape[1])[None], causal_mask(torch.ones_like(ids)), runtime_gather_output=True
        )
    padding_wins = int((raw.argmax(-1) >= TINY_LLAMA["vocab_size"]).sum())
    return {"joining": joining, "pressure": pressure, "refs": refs, "padding_wins": padding_wins}


@pytest.fixture(scope="module")
def tp1_model(tp1):
    return random_tiny_llama(tp1)


def test_tokenizer_adapter_gives_megatron_the_hf_ids_text_and_eos():
    from megatron_bdlora.inference.megatron_engine import HFTokenizerAdapter

    tok = HFTokenizerAdapter(word_tokenizer())
    assert tok.tokenize("t3 t4 t5") == [3, 4, 5]
    assert tok.detokenize([5, 6, 250]) == "t5 t6"  # EOS skipped
    assert (tok.eod, tok.bos, tok.vocab_size) == (250, None, 251)


def test_requests_joining_a_running_batch_get_full_recompute_greedy_tokens(tp1_model):
    tokens, seen = run_engine(engine_for(tp1_model), JOINING_PROMPTS, JOINING_ARRIVALS)
    assert seen["chunked"], "the 70-token prompt must be prefilled in chunks (max_tokens=64)"
    for rid, prompt in JOINING_PROMPTS.items():
        assert len(tokens[rid]) == NEW_TOKENS
        assert tokens[rid] == full_recompute_greedy(tp1_model, prompt_ids(prompt), tokens[rid]), f"request {rid}"


def test_pausing_and_eviction_keep_full_recompute_greedy_tokens(tp1, tp1_model):
    engine = engine_for(tp1_model, buffer_size_gb=kv_buffer_gb(tp1, 14), paused_buffer_size_gb=kv_buffer_gb(tp1, 3))
    assert engine.context.block_allocator.total_count == 14  # 13 usable + megatron's dummy block
    tokens, seen = run_engine(engine, PRESSURE_PROMPTS, PRESSURE_ARRIVALS)
    assert seen["max_paused"] > 0, "the KV buffer never ran out: no request was paused"
    evicted = [rid for rid, events in seen["events"].items() if "EVICT" in events]
    assert seen["evicted"] > 0 and evicted, seen
    for rid, prompt in PRESSURE_PROMPTS.items():
        assert len(tokens[rid]) == NEW_TOKENS
        assert tokens[rid] == full_recompute_greedy(tp1_model, prompt, tokens[rid]), (
            f"request {rid} {seen['events'][rid]}"
        )


def test_suspend_and_resume_keep_full_recompute_greedy_tokens(tp1_model):
    tokens, seen = run_engine(engine_for(tp1_model), PRESSURE_PROMPTS, PRESSURE_ARRIVALS, suspend_at=2)
    assert [seen["events"][rid].count("ADD") for rid in range(4)] == [2, 2, 2, 1]  # re-added at resume
    for rid, prompt in PRESSURE_PROMPTS.items():
        assert tokens[rid] == full_recompute_greedy(tp1_model, prompt, tokens[rid]), f"request {rid}"


@pytest.mark.multi_rank
def test_tp2_engine_gives_full_recompute_greedy_tokens_on_every_rank():
    results = run_distributed(joining_and_pressure_worker, 2)
    assert results[0]["joining"][0] == results[1]["joining"][0]
    assert results[0]["pressure"][0] == results[1]["pressure"][0]
    assert results[1]["padding_wins"] > 0, "padding logits must be able to win for the check below to mean anything"
    for out in results:
        for name in ("joining", "pressure"):
            tokens, seen = out[name]
            assert all(len(t) == NEW_TOKENS for t in tokens.values()) and len(tokens) == 4
            assert tokens == out["refs"][name], name
        assert out["joining"][1]["chunked"]
        assert out["pressure"][1]["max_paused"] > 0 and out["pressure"][1]["evicted"] > 0


def test_build_rejects_a_token_budget_off_megatrons_64_grid_and_foreign_metadata_types(tp1_model):
    with pytest.raises(ValueError, match="multiple of 64"):
        engine_for(tp1_model, max_tokens=48)
    with pytest.raises(ValueError, match="get_metadata_types"):
        engine_for(tp1_model, request_metadata_types=[("top_k", torch.int32, False)])
