"""Log-probabilities from the serving loop against transformers + PEFT: every prompt token's (prompt_logprobs, scored
during prefill, chunked or not) and every generated token's, with their top-k, for BD adapters of different ranks and
the base model in one mixed batch, at TP 1, 2 and (SmolLM2) 3; requests that ask for nothing are served alongside."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft_reference import peft_model, random_factors
from serving_reference import SERVE_LLAMA, serve_base, write_adapters

from megatron_bdlora.config import LoRASettings
from megatron_bdlora.local_ranks import run_distributed

pytestmark = pytest.mark.multi_rank

TOLERANCE = 1e-4
# a 64-token step budget: a 100-token prompt is prefilled in two chunks or more
LOOP = dict(max_loras=4, max_lora_rank=16, max_model_len=160, max_num_seqs=8, max_num_batched_tokens=64,
            block_size=16)
# TP=1: a KV cache of 10 blocks (2 K/V x 2 layers x 16 tokens x 4 heads x 8 dims x 4 bytes each): requests are
# paused and evicted (re-prefilled with their generated tokens) while others run
TIGHT = LOOP | dict(kv_cache_gb=10 * 2 * 2 * 16 * 4 * 8 * 4 / 1024**3)


# ---------------------------------------------------------------------------------------------- in the ranks
def serve_jobs(info, meg, adapters, jobs, loop_kwargs, mode="block_diagonal"):
    """Run jobs (arrival step, prompt ids, adapter or None, GenerationParams) through a serving loop stepped in
    lockstep; rank 0 returns each job's events and the ids of the requests whose prefill was chunked."""
    from megatron_bdlora.inference.serving_loop import ServingConfig, ServingLoop

    loop = ServingLoop.create(ServingConfig(megatron_dir=meg, mode=mode, adapters=adapters, **loop_kwargs), info)
    queues, events, chunked, evicted = {}, {i: [] for i in range(len(jobs))}, set(), set()
    tokens_of = loop._tokens

    def tokens_noting_evictions(record):  # an evicted request's record holds one request per (re-)prefill
        if len(record.requests) > 1:
            evicted.add(record.request_id)
        return tokens_of(record)

    loop._tokens = tokens_noting_evictions
    scored_rows = count_prompt_rows_scored()
    for step in range(1000):
        if info.rank == 0:
            for i, (arrive, prompt, adapter, params) in enumerate(jobs):
                if arrive == step:
                    queues[i] = loop.submit(prompt, adapter, params)
        loop.step()
        chunked.add(loop.engine.context.chunked_prefill_request_id)  # mid-prefill after this step
        done = True
        if info.rank == 0:
            for i, (_, q) in queues.items():
                while not q.empty():
                    events[i].append(q.get())
            done = len(queues) == len(jobs) and all(e and e[-1].finished for e in events.values())
        flag = torch.tensor([int(done)])
        if info.tp_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item():
            break
    stats = {"evicted_jobs": sorted(i for i, (rid, _) in queues.items() if rid in evicted),
             "chunked_jobs": sorted(i for i, (rid, _) in queues.items() if rid in chunked),
             "pending_scores": len(loop.prompt_scores.pending) + len(loop.prompt_scores.complete),
             "scored_rows": scored_rows[0]}
    return (events, stats) if info.rank == 0 else None


def count_prompt_rows_scored() -> list[int]:
    """A one-item list counting the prompt positions this rank scores from now on (each log_softmax row)."""
    from megatron_bdlora.inference import prompt_scores

    count, score = [0], prompt_scores.top_logprobs

    def counting(logits, chosen, ks):
        count[0] += len(ks)
        return score(logits, chosen, ks)

    prompt_scores.top_logprobs = counting
    return count


def scored_once(jobs) -> int:
    """Prompt positions to score when every asking prompt is scored exactly once."""
    return sum(len(prompt) - 1 for _, prompt, _, params in jobs if params.prompt_logprobs is not None)


# ---------------------------------------------------------------------------------------------- reference
def reference_logprobs(hf_model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of the reference's logits at every position of prompt + generated: [len - 1, vocab] (row t
    predicts token t + 1)."""
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([prompt + generated])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def check_entry(label: str, got, want_row: torch.Tensor, token: int, k: int) -> None:
    """One TokenLogprob against the reference row: the token's logprob, the top-k values and ids (ids where the
    reference separates them by more than the tolerance: ties aside)."""
    assert got.token_id == token, f"{label}: token {got.token_id} vs {token}"
    err = abs(got.logprob - want_row[token].item())
    assert err <= TOLERANCE, f"{label}: logprob {got.logprob} vs {want_row[token].item()} ({err:.3g})"
    assert len(got.top) == k, f"{label}: {len(got.top)} alternatives for k={k}"
    if not k:
        return
    values, ids = want_row.topk(k + 1)
    for rank, (tid, lp) in enumerate(got.top):
        assert abs(lp - values[rank].item()) <= TOLERANCE, f"{label}: top {rank} logprob {lp} vs {values[rank].item()}"
        assert abs(lp - want_row[tid].item()) <= TOLERANCE, f"{label}: top {rank} is token {tid}, not that likely"
        separated = all(abs(values[rank] - values[o]).item() > 2 * TOLERANCE for o in (rank - 1, rank + 1) if o >= 0)
        assert tid == ids[rank].item() or not separated, f"{label}: top {rank} is {tid}, reference {ids[rank].item()}"


def check_job(label: str, events: list, prompt: list[int], params, hf_model) -> None:
    """A finished job's tokens (greedy: the reference's argmax), prompt and token log-probabilities."""
    assert events and events[-1].finished and events[-1].finish_reason == "length", f"{label}: {events[-1:]}"
    tokens = [t for e in events for t in e.token_ids]
    assert len(tokens) == params.max_tokens, f"{label}: {len(tokens)} tokens for max_tokens={params.max_tokens}"
    want = reference_logprobs(hf_model, prompt, tokens)
    generated_rows = want[len(prompt) - 1 :]
    assert tokens == generated_rows.argmax(-1).tolist()[: len(tokens)], f"{label}: not the reference's greedy tokens"
    scores = [e.prompt_logprobs for e in events]
    if params.prompt_logprobs is None:
        assert scores == [None] * len(events), f"{label}: prompt log-probabilities nobody asked for"
    else:
        assert scores[0] is not None and scores[1:] == [None] * (len(events) - 1), f"{label}: not on the first event"
        assert len(scores[0]) == len(prompt) and scores[0][0] is None, f"{label}: {len(scores[0])} prompt entries"
        for t in range(1, len(prompt)):
            check_entry(f"{label} prompt {t}", scores[0][t], want[t - 1], prompt[t], params.prompt_logprobs)
    logprobs = [lp for e in events for lp in e.logprobs]
    for e in events:
        assert len(e.logprobs) == (len(e.token_ids) if params.logprobs is not None else 0), f"{label}: misaligned"
    for j, entry in enumerate(logprobs):
        check_entry(f"{label} token {j}", entry, generated_rows[j], tokens[j], params.logprobs)


def hf_references(meg: Path, adapters: dict[str, str], tp: int, names) -> dict:
    """transformers (+ PEFT with each adapter's stored factors), float32, per adapter name (None: the base)."""
    from transformers import LlamaForCausalLM

    from megatron_bdlora.base_models import resolve_hf_base
    from megatron_bdlora.checkpoint.reader import read_adapter

    hf_dir = resolve_hf_base("smollm2-135m-instruct", random_config=SERVE_LLAMA, seed=0)
    base = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_config = json.loads((meg / "config.json").read_text())
    out = {None: base}
    for name in names:
        ckpt = read_adapter(adapters[name], hf_config, tp, "block_diagonal")
        out[name] = peft_model(copy.deepcopy(base), ckpt.settings, ckpt.factors)
    return out


def mixed_jobs(names: list[str], seed: int):
    """Greedy jobs for every adapter and the base: prompt scores (k 0..5), token logprobs, both, neither; a
    100-token prompt (chunked) and a prompt only scored (max_tokens 0), arriving over the first steps."""
    from megatron_bdlora.inference.requests import GenerationParams

    rng = random.Random(seed)
    asks = [dict(prompt_logprobs=3, logprobs=2), dict(prompt_logprobs=0), dict(logprobs=5), {},
            dict(prompt_logprobs=5, logprobs=0)]
    jobs = []
    for i, adapter in enumerate(names + [None] + names):
        length = 100 if i == 1 else rng.randrange(3, 30)
        prompt = [rng.randrange(100, 40000) for _ in range(length)]
        params = GenerationParams(max_tokens=rng.randrange(3, 7), temperature=0.0, ignore_eos=True, **asks[i % 5])
        jobs.append((i // 3, prompt, adapter, params))
    prompt = [rng.randrange(100, 40000) for _ in range(20)]
    jobs.append((1, prompt, names[0], GenerationParams(max_tokens=0, temperature=0.0, prompt_logprobs=2)))
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_prompt_and_token_logprobs_of_a_mixed_adapter_batch_equal_peft_log_softmax(tp, tmp_path):
    meg = serve_base(tp)
    names = ["a0", "a1", "a3"]  # ranks 4, 2 and 8 (x TP), different targets
    adapters = write_adapters(tmp_path, meg, tp, names)
    jobs = mixed_jobs(names, seed=tp)
    events, stats = run_distributed(serve_jobs, tp, meg, adapters, jobs, LOOP)[0]
    assert 1 in stats["chunked_jobs"], "the 100-token prompt was meant to be prefilled in several chunks"
    assert stats["pending_scores"] == 0, "prompt scores kept after their requests finished"
    assert stats["scored_rows"] == scored_once(jobs), "prompt positions scored more than once, or not scored"
    refs = hf_references(meg, adapters, tp, names)
    for i, (_, prompt, adapter, params) in enumerate(jobs[:-1]):
        check_job(f"tp={tp} job {i} ({adapter}, {len(prompt)} tokens)", events[i], prompt, params, refs[adapter])
    scored, prompt = events[len(jobs) - 1], jobs[-1][1]
    assert [(e.token_ids, e.logprobs, e.finish_reason) for e in scored] == [((), (), "length")], scored
    want = reference_logprobs(refs[names[0]], prompt, [])
    assert len(scored[0].prompt_logprobs) == len(prompt) and scored[0].prompt_logprobs[0] is None
    for t in range(1, len(prompt)):
        check_entry(f"tp={tp} scoring only, prompt {t}", scored[0].prompt_logprobs[t], want[t - 1], prompt[t], 2)


@pytest.mark.slow
def test_evicted_requests_keep_their_token_logprobs_and_are_not_scored_twice(tmp_path):
    meg = serve_base(1)
    names = ["a0", "a1", "a3"]
    adapters = write_adapters(tmp_path, meg, 1, names)
    jobs = [(0, prompt, adapter, replace(params, max_tokens=params.max_tokens + 12))
            for _, prompt, adapter, params in mixed_jobs(names, seed=3)[:-1]]
    events, stats = run_distributed(serve_jobs, 1, meg, adapters, jobs, TIGHT)[0]
    evicted = [jobs[i][3] for i in stats["evicted_jobs"]]
    assert any(p.prompt_logprobs is not None for p in evicted) and any(p.logprobs is not None for p in evicted), (
        f"the KV cache was meant to evict requests asking for log-probabilities: evicted {stats['evicted_jobs']}")
    assert stats["pending_scores"] == 0 and stats["scored_rows"] == scored_once(jobs), stats
    refs = hf_references(meg, adapters, 1, names)
    for i, (_, prompt, adapter, params) in enumerate(jobs):
        check_job(f"job {i} ({adapter}, {len(prompt)} tokens)", events[i], prompt, params, refs[adapter])


TEXTS = (  # prompts of an evaluation: real text (random ids would score tokens the model never expects)
    "The capital of France is Paris, a city known for its museums, its cafes and the river that crosses it.",
    "Question: what do plants need to grow? Answer: water, light and",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def add(a, b):\n    return",
)


@pytest.mark.slow
def test_smollm2_at_tp3_prompt_and_token_logprobs_of_peft_adapters_equal_peft_log_softmax(tmp_path):
    """The embedded SmolLM2-135M-Instruct, two PEFT-written BD adapters (nblocks 3) and the base in one batch; one
    prompt long enough to be prefilled in chunks. The adapters' factors are of a trained adapter's size (~0.05):
    much larger ones make the model chaotic enough that float32 rounding alone (TP=3's sums in another order) moves
    log-probabilities by ~1e-4."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megatron_bdlora.base_models import ensure_megatron_base, resolve_hf_base
    from megatron_bdlora.inference.requests import GenerationParams

    hf_dir = resolve_hf_base("smollm2-135m-instruct")
    meg = ensure_megatron_base(hf_dir, 3)
    base = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    refs, adapters = {None: base}, {}
    settings_list = (LoRASettings(rank=6, alpha=12, nblocks=3),
                     LoRASettings(rank=12, alpha=8, nblocks=3, targets=("q_proj", "v_proj", "down_proj")))
    for seed, settings in enumerate(settings_list):
        name = f"bd{seed}"
        refs[name] = peft_model(copy.deepcopy(base), settings,
                                random_factors(base.config.to_dict(), settings, seed=seed))
        refs[name].save_pretrained(tmp_path / name)  # PEFT's own files (use_bdlora)
        adapters[name] = str(tmp_path / name)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    jobs = []
    for i, (name, text) in enumerate([("bd0", " ".join(TEXTS) * 3), ("bd1", TEXTS[0]), (None, TEXTS[1]),
                                      ("bd0", TEXTS[2]), ("bd1", TEXTS[3])]):
        ask = dict(prompt_logprobs=2, logprobs=3) if i % 2 == 0 else dict(logprobs=1, prompt_logprobs=0)
        prompt = tok.encode(text)
        jobs.append((0, prompt, name, GenerationParams(max_tokens=3, temperature=0.0, ignore_eos=True, **ask)))
    loop = dict(max_loras=2, max_lora_rank=12, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=192,
                kv_cache_gb=0.1)
    events, stats = run_distributed(serve_jobs, 3, meg, adapters, jobs, loop)[0]
    assert 0 in stats["chunked_jobs"], "the 210-token prompt was meant to be prefilled in chunks"
    for i, (_, prompt, name, params) in enumerate(jobs):
        check_job(f"SmolLM2 tp=3 job {i} ({name}, {len(prompt)} tokens)", events[i], prompt, params, refs[name])
        moved = (reference_logprobs(refs[name], prompt, []) - reference_logprobs(base, prompt, [])).abs().max()
        assert name is None or moved > 0.05, f"adapter {name} too weak to test anything: moves logprobs by {moved}"
