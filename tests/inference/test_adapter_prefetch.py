"""Overlap loading: with more adapters than --max-cpu-loras, an adapter dropped from the host cache is read again by
each rank's background reader while its requests wait and the others decode. Checked against the request alone
with its adapter merged (exact), against the time a slowed read takes (steps keep running meanwhile), and at TP=2
against a read that fails on one rank only (both ranks fail its requests alike; one all-reduce per step while
reads are in flight, none otherwise)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from serving_reference import merged_references, serve_base, write_adapters
from test_serving_loop import _check, _stream

from megatron_bdlora.local_ranks import run_distributed

pytestmark = pytest.mark.multi_rank

SMALL = dict(max_lora_rank=16, max_model_len=96, max_num_seqs=8, max_num_batched_tokens=64)


# ---------------------------------------------------------------------------------------------- helpers (in ranks)
def _loop(info, meg, adapters, **kwargs):
    from megatron_bdlora.inference.serving_loop import ServingConfig, ServingLoop

    config = ServingConfig(megatron_dir=meg, mode="block_diagonal", adapters=adapters, **(SMALL | kwargs))
    return ServingLoop.create(config, info)


def _drive(loop, info, stream, max_steps: int = 3000) -> tuple[dict, list[tuple[bool, Counter]]]:
    """Run (arrival step, prompt, adapter, max_tokens) requests to the end, rank 0 submitting, every rank stepping.

    Returns rank 0's {request index: tokens, finish, error, request id} and, per step on every rank, (reads in
    flight before it, all-reduces it issued outside the engine's own forward)."""
    from megatron_bdlora.comm_count import count_collectives
    from megatron_bdlora.inference.requests import GenerationParams

    queues, results, per_step = {}, {}, []
    loop.count_collectives = True
    for step in range(max_steps):
        if info.rank == 0:
            for i, (arrive, prompt, adapter, max_tokens) in enumerate(stream):
                if arrive == step:
                    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
                    rid, queues[i] = loop.submit(prompt, adapter, params)
                    results[i] = {"tokens": [], "finish": None, "error": None, "rid": rid}
        reading, loop.step_collectives = len(loop.reading), Counter()
        with count_collectives() as counts:
            loop.step(wait=True)
        per_step.append((reading, counts["all_reduce"] - loop.step_collectives["all_reduce"]))
        for i, q in queues.items():
            while not q.empty():
                ev = q.get()
                got = results[i]
                got["tokens"] += ev.token_ids
                if ev.finished:
                    got["finish"], got["error"] = ev.finish_reason, ev.error
        done = info.rank != 0 or (len(results) == len(stream) and all(r["finish"] for r in results.values()))
        flag = torch.tensor([int(done)])
        if info.tp_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item():
            return results, per_step
    raise AssertionError(f"rank {info.rank}: the requests did not finish in {max_steps} steps")


def _outcome(result: dict) -> dict:
    return {k: result[k] for k in ("tokens", "finish", "error")}


def _references(info, meg, adapters, stream):
    return merged_references(meg, info.tp_size, info.tp_rank, adapters, "block_diagonal",
                             [(p, a, n) for _, p, a, n in stream])


# ---------------------------------------------------------------------------------------------- exactness
def exact_worker(info, meg, adapters, stream):
    """Reads take 50 ms longer, as from a slow disk: several are in flight at once."""
    from megatron_bdlora.inference import adapter_slots

    loop = _loop(info, meg, adapters, max_loras=2, max_cpu_loras=2)
    real = adapter_slots.load_host_adapter
    adapter_slots.load_host_adapter = lambda *args, **kwargs: time.sleep(0.05) or real(*args, **kwargs)
    loop.samplers.record_logits = True
    collected, per_step = _drive(loop, info, stream)
    logits = {i: loop.samplers.logits.get(r["rid"], []) for i, r in collected.items()}
    return {"collected": collected, "logits": logits, "refs": _references(info, meg, adapters, stream),
            "metrics": loop.metrics(), "per_step": per_step}


@pytest.mark.slow
def test_requests_over_more_adapters_than_the_host_cache_equal_each_request_alone(tmp_path):
    """5 adapters, 2 slots, 2 host copies: most requests need a re-read, served while the others decode."""
    meg = serve_base(1)
    adapters = write_adapters(tmp_path, meg, 1, ["a0", "a1", "a2", "a3", "a4"])
    stream = _stream(list(adapters), 12, seed=5)
    result = run_distributed(exact_worker, 1, meg, adapters, stream, timeout=180)[0]
    _check(result, stream, "tp=1, 5 adapters over 2 host copies")
    metrics = result["metrics"]
    assert metrics["adapter_reads_total"] > len(adapters), metrics  # registration, then re-reads
    assert metrics["steps_waiting_for_adapter_total"] > 0 and metrics["adapter_reads_pending"] == 0, metrics
    assert max(reading for reading, _ in result["per_step"]) >= 2, "meant to have several reads in flight at once"
    assert all(n == 0 for _, n in result["per_step"]), "TP=1 must agree on reads without a collective"


# ---------------------------------------------------------------------------------------------- a slow read
SLOW_S = 1.0


def slow_read_worker(info, meg, adapters, stream):
    """a0 is dropped from the host cache at registration; its re-read sleeps SLOW_S. Every engine forward's time is
    recorded, to count the forwards that ran while the read did."""
    from megatron_bdlora.inference import adapter_slots

    loop = _loop(info, meg, adapters, max_loras=2, max_cpu_loras=2)
    real, window = adapter_slots.load_host_adapter, []

    def slow(name, *args, **kwargs):
        if name == "a0":
            window.append(time.perf_counter())
            time.sleep(SLOW_S)
            window.append(time.perf_counter())
        return real(name, *args, **kwargs)

    adapter_slots.load_host_adapter = slow
    forwards: list[float] = []
    loop.model.register_forward_pre_hook(lambda *_: forwards.append(time.perf_counter()))
    collected, _ = _drive(loop, info, stream)
    during = sum(window[0] < t < window[1] for t in forwards)
    return {"collected": collected, "refs": _references(info, meg, adapters, stream), "forwards_during_read": during,
            "metrics": loop.metrics()}


@pytest.mark.slow
def test_decode_steps_of_resident_adapters_go_on_while_an_adapter_is_read(tmp_path):
    meg = serve_base(1)
    adapters = write_adapters(tmp_path, meg, 1, ["a0", "a1", "a2"])
    stream = [(0, [21, 22, 23], "a1", 48), (0, [31, 32, 33, 34], None, 48), (2, [11, 12, 13, 14], "a0", 6)]
    result = run_distributed(slow_read_worker, 1, meg, adapters, stream, timeout=180)[0]
    for i, (tokens, _) in enumerate(result["refs"]):
        assert _outcome(result["collected"][i]) == {"tokens": tokens, "finish": "length", "error": None}, f"request {i}"
    assert result["forwards_during_read"] > 0, "the engine waited for the adapter read"
    metrics = result["metrics"]
    assert metrics["adapter_read_seconds_max"] >= SLOW_S and metrics["steps_waiting_for_adapter_total"] > 0, metrics


# ---------------------------------------------------------------------------------------------- TP=2: one rank fails
def one_rank_fails_worker(info, meg, adapters, first, second):
    """Rank 1 alone cannot read a0 for the first stream; the second stream reads it on both ranks and serves it."""
    from megatron_bdlora.inference import adapter_slots

    loop = _loop(info, meg, adapters, max_loras=2, max_cpu_loras=2)
    real = adapter_slots.load_host_adapter

    def unreadable_on_rank_1(name, *args, **kwargs):
        if name == "a0" and info.rank == 1:
            raise OSError("simulated: rank 1 cannot read a0")
        return real(name, *args, **kwargs)

    adapter_slots.load_host_adapter = unreadable_on_rank_1
    failing, steps_failing = _drive(loop, info, first)
    adapter_slots.load_host_adapter = real
    served, steps_served = _drive(loop, info, second)
    return {"failing": failing, "served": served, "per_step": steps_failing + steps_served,
            "refs": _references(info, meg, adapters, second), "failed": loop.counters["failed"],
            "steps": loop.step_count, "metrics": loop.metrics()}


@pytest.mark.slow
def test_a_read_failing_on_one_rank_fails_its_requests_on_both_and_the_others_go_on(tmp_path):
    meg = serve_base(2)
    adapters = write_adapters(tmp_path, meg, 2, ["a0", "a1", "a2"])
    prompts = {"a0": [11, 12, 13, 14], "a1": [21, 22, 23], None: [31, 32, 33, 34, 35]}
    first = [(0, prompts["a0"], "a0", 6), (0, prompts["a1"], "a1", 6), (0, prompts[None], None, 6),
             (1, prompts["a0"], "a0", 6)]
    second = [(0, p, a, 6) for a, p in prompts.items()]
    rank0, rank1 = run_distributed(one_rank_fails_worker, 2, meg, adapters, first, second, timeout=180)
    refs = dict(zip(prompts, rank0["refs"]))
    for i, (_, _, adapter, _) in enumerate(first):
        got = rank0["failing"][i]
        if adapter == "a0":
            assert got["finish"] == "error" and got["tokens"] == [], got
            assert "adapter 'a0' could not be re-read" in got["error"] and "TP rank(s) [1]" in got["error"], got
        else:
            assert _outcome(got) == {"tokens": refs[adapter][0], "finish": "length", "error": None}, f"request {i}"
    for i, adapter in enumerate(prompts):  # read again on both ranks: a0 is served, exactly
        assert _outcome(rank0["served"][i]) == {"tokens": refs[adapter][0], "finish": "length", "error": None}, adapter
    alike = [(rank["failed"], rank["steps"]) for rank in (rank0, rank1)]
    assert alike[0] == alike[1] and alike[0][0] == 2, f"(failed requests, steps) per rank: {alike}"
    for rank in (rank0, rank1):  # one all-reduce on each step with reads in flight, none on the others
        assert all(n == int(reading > 0) for reading, n in rank["per_step"]), rank["per_step"]
        assert sum(reading for reading, _ in rank["per_step"]) > 0
