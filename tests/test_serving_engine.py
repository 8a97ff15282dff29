"""The serving loop on megatron's dynamic engine: a stream of requests for many adapters (and the base model),
arriving at different steps, with pausing/eviction and adapter-slot eviction, each request checked against
the same request alone with its adapter merged into the base weights and recomputed without a KV cache."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_bdlora.local_ranks import run_distributed
from serving_reference import merged_reference, serve_base, write_adapters

MODES = ("block_diagonal", "slora", "replicated")


def _stream(names: list[str], count: int, seed: int) -> list[tuple[int, list[int], str | None, int]]:
    """(arrival step, prompt ids, adapter or None, max_tokens) per request; every adapter and the base appear."""
    rng = random.Random(seed)
    choices = names + [None]
    out = []
    for i in range(count):
        adapter = choices[i % len(choices)]
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randrange(3, 40))]
        out.append((i // 2 + rng.randrange(0, 3), prompt, adapter, rng.randrange(4, 9)))
    return out


def stream_worker(info, meg_dir, adapters, mode, stream, loop_kwargs):
    """Run the stream through the serving loop (rank 0 submits; every rank steps); then the references."""
    from megatron_bdlora.inference.engine import ServingConfig, ServingLoop
    from megatron_bdlora.inference.requests import GenerationParams

    config = ServingConfig(megatron_dir=meg_dir, mode=mode, adapters=adapters, **loop_kwargs)
    loop = ServingLoop.create(config, info)
    loop.samplers.record_logits = True
    queues, collected = {}, {}
    for step in range(400):
        if info.rank == 0:
            for i, (arrive, prompt, adapter, max_tokens) in enumerate(stream):
                if arrive == step:
                    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
                    queues[i] = loop.submit(prompt, adapter, params)
        loop.step()
        done = info.rank != 0 or (len(queues) == len(stream) and all(i in collected for i in queues))
        if info.rank == 0:
            for i, (rid, q) in queues.items():
                while not q.empty():
                    ev = q.get()
                    collected.setdefault(i, {"tokens": [], "finish": None, "rid": rid})
                    collected[i]["tokens"] += ev.token_ids
                    if ev.finished:
                        collected[i]["finish"] = ev.finish_reason
            done = len(queues) == len(stream) and all(c["finish"] for c in collected.values()) and len(collected) == len(stream)
        flag = torch.tensor([int(done)])
        if info.tp_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item():
            break
    stats = {"engine_evictions": loop.engine.evicted_request_count, "pool": loop.pool.stats(), "steps": step}
    logits = {i: loop.samplers.logits.get(c["rid"], []) for i, c in collected.items()}
    refs = [merged_reference(meg_dir, info.tp_size, info.tp_rank, None if a is None else adapters[a], mode, p, n)
            for _, p, a, n in stream]
    return {"collected": collected, "logits": logits, "refs": refs, "stats": stats}


def _check(result, stream, label):
    collected, refs = result["collected"], result["refs"]
    assert len(collected) == len(stream), f"{label}: {len(collected)} of {len(stream)} requests finished"
    for i, (_, prompt, adapter, max_tokens) in enumerate(stream):
        want_tokens, want_logits = refs[i]
        got = collected[i]
        assert got["finish"] == "length", f"{label}: request {i} finished with {got['finish']}"
        assert got["tokens"] == want_tokens, f"{label}: request {i} ({adapter}, prompt {len(prompt)}) tokens differ"
        got_logits = result["logits"][i]
        assert len(got_logits) == max_tokens, f"{label}: request {i}: {len(got_logits)} logit rows for {max_tokens} tokens"
        err = max((g - w).abs().max().item() for g, w in zip(got_logits, want_logits))
        assert err <= 1e-4, f"{label}: request {i} ({adapter}): logits differ by {err:.3g}"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = {}
    for tp in (1, 2):
        meg = serve_base(tp)
        out[tp] = (meg, write_adapters(tmp_path_factory.mktemp(f"adapters_tp{tp}"), meg, tp, ["a0", "a1", "a2", "a3"]))
    return out


# a KV buffer of a few blocks: requests get paused and evicted while others run
TIGHT = dict(max_loras=4, max_lora_rank=16, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64,
             kv_cache_gb=6 * 16 * 2 * 2 * 4 * 8 * 4 / 1024**3, block_size=16)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_mixed_adapter_stream_matches_each_request_alone_with_its_adapter_merged(served, tp, mode):
    meg, adapters = served[tp]
    stream = _stream(list(adapters), 10, seed=tp)
    results = run_distributed(stream_worker, tp, meg, adapters, mode, stream, TIGHT)
    _check(results[0], stream, f"tp={tp} {mode}")
    assert results[0]["stats"]["engine_evictions"] > 0, "the stream was meant to force a KV-cache eviction"
