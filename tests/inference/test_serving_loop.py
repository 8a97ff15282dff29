"""The serving loop on megatron's dynamic engine: a stream of requests for many adapters (and the base model),
arriving at different steps, with pausing/eviction and adapter-slot eviction, each request checked against
the same request alone with its adapter merged into the base weights and recomputed without a KV cache."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from serving_reference import SERVE_LLAMA, merged_references, serve_base, write_adapters

from megatron_bdlora.local_ranks import run_distributed

pytestmark = pytest.mark.multi_rank

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


def modes_worker(info, meg_dir, adapters, modes, stream, loop_kwargs, backend="auto"):
    """stream_worker for several modes in one set of ranks (process start-up is most of a small test's time)."""
    from megatron_bdlora.ops import set_backend

    set_backend(backend)
    return [stream_worker(info, meg_dir, adapters, mode, stream, loop_kwargs) for mode in modes]


def stream_worker(info, meg_dir, adapters, mode, stream, loop_kwargs):
    """Run the stream through the serving loop (rank 0 submits; every rank steps); then the references."""
    from megatron_bdlora.inference.requests import GenerationParams
    from megatron_bdlora.inference.serving_loop import ServingConfig, ServingLoop

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
            done = (
                len(queues) == len(stream)
                and all(c["finish"] for c in collected.values())
                and len(collected) == len(stream)
            )
        flag = torch.tensor([int(done)])
        if info.tp_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item():
            break
    stats = {"engine_evictions": loop.engine.evicted_request_count, "pool": loop.pool.stats(), "steps": step}
    logits = {i: loop.samplers.logits.get(c["rid"], []) for i, c in collected.items()}
    refs = merged_references(meg_dir, info.tp_size, info.tp_rank, adapters, mode, [(p, a, n) for _, p, a, n in stream])
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
        assert len(got_logits) == max_tokens, (
            f"{label}: request {i}: {len(got_logits)} logit rows for {max_tokens} tokens"
        )
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


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2])  # TP=1 is the same code unsharded (its engine runs in the tests below)
def test_mixed_adapter_stream_matches_each_request_alone_with_its_adapter_merged(served, tp):
    meg, adapters = served[tp]
    stream = _stream(list(adapters), 10, seed=tp)
    results = run_distributed(modes_worker, tp, meg, adapters, MODES, stream, TIGHT)
    for mode, result in zip(MODES, results[0]):
        _check(result, stream, f"tp={tp} {mode}")
        assert result["stats"]["engine_evictions"] > 0, f"{mode}: the stream was meant to force a KV-cache eviction"


@pytest.mark.slow
def test_mixed_adapter_stream_is_exact_with_the_triton_kernels(served, monkeypatch):
    """A shorter stream through the Triton kernels at TP=2, BD mode (S-LoRA's all-gathered rank space and row
    slices are in the shared ops suite). On CPU they run in Triton's interpreter (~50 ms a launch); the whole
    suite runs on them with MEGATRON_BDLORA_LORA_BACKEND=triton (and TRITON_INTERPRET=1 without a GPU)."""
    if not torch.cuda.is_available():  # set before the ranks import triton (megatron does, early)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    meg, adapters = served[2]
    stream = [(arrive, prompt, adapter, 4) for arrive, prompt, adapter, _ in _stream(list(adapters), 5, seed=2)]
    modes = ("block_diagonal",)
    results = run_distributed(modes_worker, 2, meg, adapters, modes, stream, TIGHT, "triton")
    for mode, result in zip(modes, results[0]):
        _check(result, stream, f"triton tp=2 {mode}")


@pytest.mark.slow
def test_two_slots_serve_five_adapters_with_evictions_and_reloads(served, tmp_path):
    """--max-loras 2, 5 adapters in the stream: requests wait for a slot, never fail, and stay exact."""
    meg, _ = served[2]
    adapters = write_adapters(tmp_path, meg, 2, ["a0", "a1", "a2", "a3", "a4"])
    stream = [(2 * i, p, a, n) for i, (_, p, a, n) in enumerate(_stream(list(adapters), 14, seed=7))]  # spread out
    pool = dict(TIGHT, max_loras=2, max_cpu_loras=3, kv_cache_gb=0.01)
    result = run_distributed(stream_worker, 2, meg, adapters, "block_diagonal", stream, pool)[0]
    _check(result, stream, "tp=2, 2 slots")
    stats = result["stats"]["pool"]
    assert stats["evictions"] > 0 and stats["loads"] > 5, stats  # slots were recycled and adapters reloaded
    assert stats["host_evictions"] > 0 and stats["host_loads"] > 5, (
        stats
    )  # and dropped from / reread into the host cache


def collectives_worker(info, meg_dir, adapters, modes):
    """Per mode, the collectives of one decode step: 4 base-only requests, then 4 requests for 4 different adapters."""
    return {mode: _decode_collectives(info, meg_dir, adapters, mode) for mode in modes}


def _decode_collectives(info, meg_dir, adapters, mode):
    from megatron_bdlora.inference.requests import GenerationParams
    from megatron_bdlora.inference.serving_loop import ServingConfig, ServingLoop
    from megatron_bdlora.layers import LoRAParallelLinear
    from megatron_bdlora.sharding import Collective

    loop = ServingLoop.create(ServingConfig(megatron_dir=meg_dir, mode=mode, adapters=adapters, max_loras=4,
                                            max_lora_rank=16, max_num_batched_tokens=64), info)
    loop.count_collectives = True
    counts = {}
    for label, names in (("base", [None] * 4), ("adapters", list(adapters))):
        if info.rank == 0:
            for i, name in enumerate(names):
                loop.submit(
                    [100 + i, 200, 300 + i], name, GenerationParams(max_tokens=4, temperature=0.0, ignore_eos=True)
                )
        for _ in range(3):  # prefill, then decode steps
            loop.step()
            assert loop.engine.context.is_decode_only() or _ == 0
        counts[label] = dict(loop.step_collectives)
        while loop.engine.has_unfinished_requests():
            loop.step()
    extra = sum(ad.plan.collective is not Collective.NONE for m in loop.model.modules()
                if isinstance(m, LoRAParallelLinear) for ad in m.lora.values())
    return counts, extra


def test_decode_step_collectives_bd_equal_base_slora_adds_the_plans(served):
    meg, adapters = served[2]
    per_mode = run_distributed(collectives_worker, 2, meg, adapters, MODES)[0]
    layers = SERVE_LLAMA["num_hidden_layers"]
    for mode, (counts, sub_projection_collectives) in per_mode.items():
        base, mixed = Counter(counts["base"]), Counter(counts["adapters"])
        assert sum(base.values()) > 0, "the base model's own all-reduces should be counted"
        if mode == "slora":
            # one all-gather per column layer (qkv, fc1) and one all-reduce per row layer (proj, fc2): 2 per pair
            assert mixed - base == Counter(all_gather_into_tensor=2 * layers, all_reduce=2 * layers), (base, mixed)
            assert sub_projection_collectives == 7 * layers  # per adapter; fused sub-projections share one collective
        else:
            assert mixed == base, f"{mode}: a batch of 4 adapters must add no collective: {base} vs {mixed}"


def unload_worker(info, meg_dir, adapters):
    """Unload an adapter while its request runs (waits for it); the other requests are untouched."""
    from megatron_bdlora.inference.requests import GenerationParams
    from megatron_bdlora.inference.serving_loop import ServingConfig, ServingLoop

    loop = ServingLoop.create(ServingConfig(megatron_dir=meg_dir, mode="block_diagonal", adapters=adapters,
                                            max_loras=2, max_lora_rank=16, max_num_batched_tokens=64), info)
    loop.start()
    prompts = {"a0": [11, 12, 13, 14], "a1": [21, 22, 23], None: [31, 32, 33, 34, 35]}
    greedy = GenerationParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    queues = {name: loop.submit(p, name, greedy)[1] for name, p in prompts.items()}
    loop.unload_adapter("a0")  # blocks until a0's request is done
    after = {"names": loop.adapter_names(), "metrics": loop.metrics()}
    try:
        loop.submit([1, 2, 3], "a0", greedy)
        after["late_submit"] = "accepted"
    except KeyError as err:
        after["late_submit"] = str(err)
    outs = {}
    for name, q in queues.items():
        tokens, finish = [], None
        while finish is None:
            ev = q.get(timeout=120)
            tokens += ev.token_ids
            finish = ev.finish_reason
        outs[name] = (tokens, finish)
    loop.shutdown()
    refs = merged_references(meg_dir, 1, 0, adapters, "block_diagonal", [(p, n, 12) for n, p in prompts.items()])
    return outs, [r[0] for r in refs], after


def test_unload_waits_for_requests_in_flight_and_changes_no_other_output(served):
    meg, adapters = served[1]
    outs, refs, after = run_distributed(unload_worker, 1, meg, {k: adapters[k] for k in ("a0", "a1")})[0]
    for (name, (tokens, finish)), want in zip(outs.items(), refs):
        assert finish == "length" and tokens == want, f"{name}: {finish} {tokens} vs {want}"
    assert after["names"] == ["a1"]
    assert "a0" in after["late_submit"] and "unknown" in after["late_submit"]


def sampling_worker(info, meg_dir, adapters, crowd):
    """A seeded sampled request alone, then among other sampled requests arriving at other steps."""
    from megatron_bdlora.inference.requests import GenerationParams
    from megatron_bdlora.inference.serving_loop import ServingConfig, ServingLoop

    loop = ServingLoop.create(ServingConfig(megatron_dir=meg_dir, mode="block_diagonal", adapters=adapters,
                                            max_loras=4, max_lora_rank=16, max_num_batched_tokens=64), info)
    runs = []
    for seeds in ([7], [7] + crowd, [8]):
        queues = []
        for i, seed in enumerate(seeds):
            params = GenerationParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=seed, ignore_eos=True)
            queues.append(loop.submit([5, 6, 7, 8, 9][: 3 + i % 3], "a0" if i % 2 == 0 else None, params)[1])
            loop.step()
        while loop.engine.has_unfinished_requests() or loop.waiting:
            loop.step()
        loop.step()
        runs.append([_drain(q) for q in queues])
    return runs


def _drain(q) -> list[int]:
    tokens = []
    while not q.empty():
        tokens += q.get_nowait().token_ids
    return tokens


def test_the_same_seed_gives_the_same_text_whatever_the_batch(served):
    meg, adapters = served[1]
    alone, crowded, other_seed = run_distributed(sampling_worker, 1, meg, {"a0": adapters["a0"]}, [1, 2, 3, 7])[0]
    assert len(alone[0]) == 10 and alone[0] == crowded[0], (alone[0], crowded[0])
    assert other_seed[0] != alone[0], "another seed should sample another text"


def validation_worker(info, meg_dir, good, bad):
    """Rank 0 loads each bad adapter into a running loop (each refused), then serves the good one."""
    from megatron_bdlora.inference.requests import GenerationParams
    from megatron_bdlora.inference.serving_loop import ServingConfig, ServingLoop

    loop = ServingLoop.create(ServingConfig(megatron_dir=meg_dir, mode="block_diagonal", adapters={}, max_loras=2,
                                            max_lora_rank=16, max_num_batched_tokens=64), info)
    if info.rank != 0:
        loop.run_follower()
        return None
    loop.start()
    errors = {}
    for name, path in bad.items():
        try:
            loop.load_adapter(name, path)
            errors[name] = "accepted"
        except (ValueError, FileNotFoundError) as err:
            errors[name] = str(err)
    loop.load_adapter("good", good)
    _, q = loop.submit([7, 8, 9], "good", GenerationParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    events = [q.get(timeout=120)]
    while not events[-1].finished:
        events.append(q.get(timeout=120))
    names = loop.adapter_names()
    loop.shutdown()
    return errors, events[-1].finish_reason, names


def test_unfit_adapters_are_refused_with_a_clear_error_and_the_loop_keeps_serving(served, tmp_path):
    import json

    from peft_reference import random_factors

    from megatron_bdlora.checkpoint.adapters import AdapterCheckpoint, save_native
    from megatron_bdlora.checkpoint.peft import export_peft_directory
    from megatron_bdlora.config import LoRASettings

    meg, adapters = served[2]
    hf_config = json.loads((meg / "config.json").read_text())

    def native(name, settings, config, tp):
        ckpt = AdapterCheckpoint(settings, config, tp, random_factors(config, settings, seed=3))
        return str(save_native(ckpt, tmp_path / name))

    bad = {
        "other_base": native("other_base", LoRASettings(rank=4, nblocks=2), {**hf_config, "intermediate_size": 128}, 2),
        "nblocks1": native("nblocks1", LoRASettings(rank=4, nblocks=1), hf_config, 1),
        "rank32": native("rank32", LoRASettings(rank=32, nblocks=2), hf_config, 2),
        "dora": str(export_peft_directory(adapters["a0"], tmp_path / "dora")),
        "missing": str(tmp_path / "missing"),
        "not_an_adapter": str(tmp_path),
    }
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    errors, finish, names = run_distributed(validation_worker, 2, meg, adapters["a1"], bad)[0]
    expect = {"other_base": "another base model", "nblocks1": "nblocks=1", "rank32": "max-lora-rank",
              "dora": "use_dora", "missing": "does not exist", "not_an_adapter": "neither a native adapter"}
    for name, words in expect.items():
        assert words in errors[name], f"{name}: {errors[name]}"
    assert finish == "length" and names == ["good"]


def cancel_worker(info, meg_dir, adapters):
    """A cancel in the middle of a chunked prefill, a stop token id and a stop string, beside an untouched request."""
    from megatron_bdlora.inference.requests import GenerationParams
    from megatron_bdlora.inference.serving_loop import ServingConfig, ServingLoop

    keep, other = ([5, 6, 7], "a1"), ([8, 9, 10, 11], None)
    refs = [r[0] for r in merged_references(meg_dir, 1, 0, adapters, "block_diagonal", [(*keep, 12), (*other, 12)])]
    loop = ServingLoop.create(ServingConfig(megatron_dir=meg_dir, mode="block_diagonal", adapters=adapters, max_loras=2,
                                            max_lora_rank=16, max_model_len=256, max_num_batched_tokens=64), info)
    full_text = loop.tokenizer.decode(refs[1], skip_special_tokens=True)
    stop_text = loop.tokenizer.decode(refs[1][4:6], skip_special_tokens=True)
    greedy = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    queues = {
        "long": loop.submit(list(range(100, 250)), "a0", GenerationParams(**greedy))[1],  # 150 tokens: chunked prefill
        "keep": loop.submit(keep[0], keep[1], GenerationParams(**greedy))[1],
        "stop_id": loop.submit(other[0], None, GenerationParams(**greedy, stop_token_ids=(refs[1][3],)))[1],
        "stop_text": loop.submit(other[0], None, GenerationParams(**greedy, stop=(stop_text,)))[1],
    }
    loop.step()
    loop.cancel(0)  # the long request, now in its chunked prefill
    for _ in range(100):
        loop.step()
        if not loop.engine.has_unfinished_requests() and not loop.waiting and not loop.deferred_aborts:
            break
    out = {}
    for name, q in queues.items():
        tokens, text, finish = [], "", None
        while not q.empty():
            ev = q.get_nowait()
            tokens, text, finish = tokens + list(ev.token_ids), text + ev.text, ev.finish_reason or finish
        out[name] = (tokens, text, finish)
    state = {"pinned_a0": loop.pool.pinned("a0"), "unfinished": loop.engine.has_unfinished_requests()}
    return out, refs, full_text, stop_text, state


def test_cancel_during_chunked_prefill_and_stops_end_requests_without_touching_others(served):
    meg, adapters = served[1]
    out, refs, full_text, stop_text, state = run_distributed(
        cancel_worker, 1, meg, {k: adapters[k] for k in ("a0", "a1")}
    )[0]
    assert out["long"][2] == "abort" and state == {"pinned_a0": 0, "unfinished": False}
    assert out["keep"][0] == refs[0] and out["keep"][2] == "length"
    assert out["stop_id"][0] == refs[1][: refs[1].index(refs[1][3])] and out["stop_id"][2] == "stop"
    assert out["stop_text"][2] == "stop" and out["stop_text"][1] == full_text[: full_text.find(stop_text)]
