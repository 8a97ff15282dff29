"""What used to stop the serving loop now fails only the request it concerns, on every TP rank alike: a sampling
failure, an adapter directory deleted, corrupted or replaced under a running server (re-read on demand with more
adapters than --max-cpu-loras), a TP rank that cannot read an adapter, concurrent loads and unloads of one name.
Each time the other requests' tokens are checked against the same requests run before the fault (greedy), and
the hooks the HTTP side relies on (lora_info, last_step_at, inflight, shutdown with a timeout) against the loop's
real state."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from serving_reference import merged_references, serve_base, write_adapters

from megatron_bdlora.local_ranks import run_distributed

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = {"a0": [11, 12, 13, 14], "a1": [21, 22, 23], "a2": [41, 42, 43, 44, 45], None: [31, 32, 33, 34, 35]}
STEPS = 6  # tokens per request


# ---------------------------------------------------------------------------------------------- helpers (in ranks)
def _loop(info, meg, adapters, **kwargs):
    from megatron_bdlora.inference.serving_loop import ServingConfig, ServingLoop

    settings = dict(max_loras=2, max_lora_rank=16, max_model_len=64, max_num_batched_tokens=64) | kwargs
    return ServingLoop.create(ServingConfig(megatron_dir=meg, mode="block_diagonal", adapters=adapters, **settings),
                              info)


def _result(q, timeout: float = 120) -> dict:
    """A request's events until the last one: tokens, finish reason, error."""
    tokens, ev = [], None
    while ev is None or not ev.finished:
        ev = q.get(timeout=timeout)
        tokens += ev.token_ids
    return {"tokens": tokens, "finish": ev.finish_reason, "error": ev.error}


def _serve(loop, adapters, params=None) -> dict:
    """One greedy request per adapter (None: the base) submitted together to a started loop; their results."""
    from megatron_bdlora.inference.requests import GenerationParams

    params = params or {}
    queues = {a: loop.submit(PROMPTS[a], a, params.get(a, GenerationParams(max_tokens=STEPS, **GREEDY)))[1]
              for a in adapters}
    return {a: _result(q) for a, q in queues.items()}


def _in_thread(fn, *args, name: str | None = None) -> tuple[threading.Thread, dict]:
    """Run fn(*args) in a thread; its return value or exception lands in the dict."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except Exception as err:
            out["error"] = err

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, out


def _wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


# ---------------------------------------------------------------------------------------------- sampling
def test_seed_outside_int64_is_refused_by_check_naming_the_range():
    from megatron_bdlora.inference.requests import GenerationParams, ParamError

    for seed in (2**63, 2**64, -(2**63) - 1):
        with pytest.raises(ParamError, match=r"int64") as err:
            GenerationParams(temperature=1.0, seed=seed).check(3, 64)
        assert err.value.param == "seed" and str(seed) in str(err.value)
    for seed in (2**63 - 1, -(2**63), 0):
        GenerationParams(temperature=1.0, seed=seed).check(3, 64)


def test_sampler_takes_any_int_seed_as_torch_does_and_a_tiny_temperature_is_the_argmax():
    from megatron_bdlora.inference.requests import GenerationParams
    from megatron_bdlora.inference.sampling import RequestSamplers

    samplers = RequestSamplers(vocab_size=50)
    samplers.add(1, GenerationParams(temperature=1.0), 2**70 + 5)  # past uint64: taken mod 2**64, never raises
    assert samplers.generators[1].initial_seed() == 5
    samplers.add(2, GenerationParams(temperature=1e-40, seed=1), -1)
    samplers.add(3, GenerationParams(temperature=5e-324, top_p=0.5, top_k=3), 3)  # the smallest float
    logits = torch.randn(3, 64) * 30
    tokens = samplers.sample([1, 2, 3], logits, chunked_prefill_id=-1)
    assert tokens[1:].tolist() == logits[1:, :50].argmax(-1).tolist() and samplers.take_failures() == {}


def test_a_request_whose_probabilities_are_not_finite_fails_alone_and_is_sampled_no_more():
    from megatron_bdlora.inference.requests import GenerationParams
    from megatron_bdlora.inference.sampling import RequestSamplers

    samplers = RequestSamplers(vocab_size=8)
    for rid in (1, 2):
        samplers.add(rid, GenerationParams(temperature=0.7, seed=rid), rid)
    logits = torch.randn(2, 8)
    logits[1, 3] = float("nan")  # request 2's logits (a model fault)
    tokens = samplers.sample([1, 2], logits, chunked_prefill_id=-1)
    failures = samplers.take_failures()
    assert list(failures) == [2] and "not finite" in failures[2] and "temperature=0.7" in failures[2]
    assert 2 not in samplers.params and 1 in samplers.params and 0 <= int(tokens[0]) < 8
    samplers.sample([1, 2], logits, chunked_prefill_id=-1)  # request 2 is now taken greedily: no new failure
    assert samplers.take_failures() == {}


def sampling_worker(info, meg, adapters):
    """Greedy requests alone, then beside a tiny-temperature request, a request whose sampling fails (its
    temperature made NaN after check(), as a model fault would make its logits) and the extreme int64 seeds."""
    from megatron_bdlora.inference.requests import GenerationParams

    loop = _loop(info, meg, adapters)
    loop.start()
    before = _serve(loop, ["a0", None])
    tiny = GenerationParams(max_tokens=STEPS, temperature=1e-40, seed=3, ignore_eos=True)
    broken = GenerationParams(max_tokens=STEPS, temperature=1.0, seed=5, ignore_eos=True)
    queues = {"broken": loop.submit(PROMPTS["a1"], "a1", broken)[1]}
    object.__setattr__(broken, "temperature", float("nan"))  # past check(): the engine must not rely on it
    queues |= {"tiny": loop.submit(PROMPTS["a1"], "a1", tiny)[1]}
    for i, seed in enumerate((2**63 - 1, -(2**63))):
        queues[f"seed{i}"] = loop.submit(PROMPTS[None], None, GenerationParams(max_tokens=STEPS, seed=seed))[1]
    during = _serve(loop, ["a0", None])
    faults = {k: _result(q) for k, q in queues.items()}
    after = _serve(loop, ["a0", "a1", None])
    state = {"failed": loop.metrics()["requests_failed_total"], "healthy": loop.healthy(), "inflight": loop.inflight()}
    assert loop.shutdown(timeout=60)
    return before, during, faults, after, state


@pytest.mark.multi_rank
def test_sampling_faults_fail_only_their_request_and_a_tiny_temperature_is_greedy(tmp_path):
    meg = serve_base(1)
    adapters = write_adapters(tmp_path, meg, 1, ["a0", "a1"])
    before, during, faults, after, state = run_distributed(sampling_worker, 1, meg, adapters, timeout=120)[0]
    assert during == before and {k: after[k] for k in before} == before
    broken = faults["broken"]
    assert broken["finish"] == "error" and "sampling failed" in broken["error"] and "not finite" in broken["error"]
    assert faults["tiny"] == after["a1"]  # temperature 1e-40: the greedy tokens, not NaN
    assert all(faults[k]["finish"] == "length" and len(faults[k]["tokens"]) == STEPS for k in ("seed0", "seed1"))
    assert state == {"failed": 1.0, "healthy": True, "inflight": 0}


# ---------------------------------------------------------------------------------------------- adapter re-reads
def _corrupt(d: Path, backup: Path) -> None:
    shutil.copytree(backup, d)
    rank_file = d / "rank_00.safetensors"
    rank_file.write_bytes(rank_file.read_bytes()[:-100])


def _replace(d: Path, other: Path) -> None:
    shutil.copytree(other, d)  # another valid adapter under the same directory


def reread_worker(info, meg, adapters, backup, other):
    """3 adapters, 2 slots, 2 host entries: a0 is dropped from the host cache when a2 is registered and never read
    again until asked for, so every request for a0 re-reads its directory. Between rounds its directory is
    deleted, corrupted, replaced by another valid adapter, then restored."""
    loop = _loop(info, meg, adapters, max_cpu_loras=2)
    loop.start()
    others = ["a1", "a2", None]
    before = _serve(loop, others)
    a0 = Path(adapters["a0"])
    faults = {"deleted": lambda: None, "corrupted": lambda: _corrupt(a0, backup),
              "replaced": lambda: _replace(a0, other), "restored": lambda: shutil.copytree(backup, a0)}
    rounds = {}
    for label, fault in faults.items():
        shutil.rmtree(a0, ignore_errors=True)
        fault()
        rounds[label] = _serve(loop, ["a0", *others])
    metrics = loop.metrics()
    assert loop.shutdown(timeout=60)
    ref = merged_references(Path(meg), 1, 0, {"a0": str(backup)}, "block_diagonal", [(PROMPTS["a0"], "a0", STEPS)])
    return before, rounds, ref[0][0], metrics


@pytest.mark.multi_rank
def test_adapter_deleted_corrupted_or_replaced_fails_only_its_requests_and_never_serves_other_weights(tmp_path):
    meg = serve_base(1)
    adapters = write_adapters(tmp_path / "served", meg, 1, ["a0", "a1", "a2"])
    backup = shutil.copytree(adapters["a0"], tmp_path / "a0_backup")
    other = write_adapters(tmp_path / "other", meg, 1, ["a1"])["a1"]  # valid, same shape, other bytes
    before, rounds, a0_reference, metrics = run_distributed(
        reread_worker, 1, meg, adapters, backup, other, timeout=180
    )[0]
    expected_error = {"deleted": "does not exist", "corrupted": "changed on disk", "replaced": "changed on disk"}
    for label, results in rounds.items():
        assert {a: results[a] for a in before} == before, f"{label}: another adapter's tokens changed"
        if label == "restored":  # the same bytes again: served, exactly
            assert results["a0"] == {"tokens": a0_reference, "finish": "length", "error": None}
            continue
        a0 = results["a0"]
        assert a0["finish"] == "error" and a0["tokens"] == [], f"{label}: {a0}"
        assert f"adapter 'a0' could not be re-read from {adapters['a0']}" in a0["error"], a0["error"]
        assert expected_error[label] in a0["error"], a0["error"]
    assert "sha256" in rounds["replaced"]["a0"]["error"]
    assert metrics["requests_failed_total"] == 3


def agreement_worker(info, meg, adapters, late):
    """TP=2: rank 1 alone cannot read a1 at start-up (the loop is refused on both ranks), then, once serving, a0
    (re-read on demand) and the adapter loaded at run time; rank 0 can read them all."""
    from megatron_bdlora.inference import adapter_slots

    unreadable: set[str] = set()  # on rank 1
    real = adapter_slots.load_host_adapter

    def unreadable_here(name, *args, **kwargs):
        if name in unreadable and info.rank == 1:
            raise OSError(f"simulated: rank 1 cannot read {name}")
        return real(name, *args, **kwargs)

    adapter_slots.load_host_adapter = unreadable_here
    unreadable.add("a1")
    try:
        _loop(info, meg, adapters, max_cpu_loras=2)
        launch_error = None
    except ValueError as err:
        launch_error = str(err)
    unreadable.clear()
    loop = _loop(info, meg, adapters, max_cpu_loras=2)
    unreadable.update({"a0", "late"})
    if info.rank == 1:
        loop.run_follower()
        return {"names": loop.adapter_names(), "steps": loop.step_count, "launch_error": launch_error}
    loop.start()
    others = ["a1", "a2", None]
    before = _serve(loop, others)
    during = _serve(loop, ["a0", *others])
    try:
        loop.load_adapter("late", late)
        load_error = None
    except ValueError as err:
        load_error = str(err)
    after = _serve(loop, others)
    assert loop.shutdown(timeout=60)
    return {"before": before, "during": during, "after": after, "load_error": load_error,
            "names": loop.adapter_names(), "steps": loop.step_count, "launch_error": launch_error}


@pytest.mark.multi_rank
def test_tp_ranks_agree_when_one_rank_cannot_read_an_adapter(tmp_path):
    meg = serve_base(2)
    adapters = write_adapters(tmp_path, meg, 2, ["a0", "a1", "a2"])
    late = write_adapters(tmp_path / "late", meg, 2, ["a1"])["a1"]
    rank0, rank1 = run_distributed(agreement_worker, 2, meg, adapters, late, timeout=120)
    before, during = rank0["before"], rank0["during"]
    assert {a: during[a] for a in before} == before and rank0["after"] == before
    assert during["a0"]["finish"] == "error" and during["a0"]["tokens"] == []
    assert "adapter 'a0' could not be re-read" in during["a0"]["error"] and "TP rank(s) [1]" in during["a0"]["error"]
    assert "adapter 'late' could not be read" in rank0["load_error"] and "TP rank(s) [1]" in rank0["load_error"]
    assert rank0["names"] == rank1["names"] == ["a0", "a1", "a2"]  # registered nowhere
    assert rank0["steps"] == rank1["steps"]  # in lockstep to the end
    assert "adapter 'a1' could not be read" in rank0["launch_error"] and "TP rank(s) [1]" in rank0["launch_error"]
    assert "simulated: rank 1 cannot read a1" in rank1["launch_error"]  # each rank says why; none serves


# ---------------------------------------------------------------------------------------------- load / unload races
def races_worker(info, meg, adapters, copy_of_a0):
    """Two unloads of a1 while its request runs; two loads of one new name while the first one reads its files."""
    from megatron_bdlora.inference import adapter_slots
    from megatron_bdlora.inference.requests import GenerationParams

    loop = _loop(info, meg, adapters)
    loop.start()
    before = _serve(loop, ["a0", "a1", None])
    long = GenerationParams(max_tokens=48, **GREEDY)
    _, running = loop.submit(PROMPTS["a1"], "a1", long)
    first, first_out = _in_thread(loop.unload_adapter, "a1")
    seen_unloading = _wait_until(lambda: "a1" in loop.unloading)  # applied: the first unload holds the name
    second, second_out = _in_thread(loop.unload_adapter, "a1")
    second.join(30)
    unloads = {"seen": seen_unloading, "second": second_out, "running": _result(running)}
    first.join(60)
    unloads |= {"alive": first.is_alive() or second.is_alive(), "first": first_out}
    try:
        loop.unload_adapter("a1")
    except KeyError as err:
        unloads["third"] = str(err)

    real, entered, release = adapter_slots.load_host_adapter, threading.Event(), threading.Event()

    def gated(name, *args, **kwargs):  # the first load's own read waits here, holding the name
        if threading.current_thread().name == "first-load":
            entered.set()
            release.wait(30)
        return real(name, *args, **kwargs)

    adapter_slots.load_host_adapter = gated
    first, first_out = _in_thread(loop.load_adapter, "copy", copy_of_a0, name="first-load")
    entered.wait(30)
    second, second_out = _in_thread(loop.load_adapter, "copy", copy_of_a0)
    second.join(30)
    release.set()
    first.join(60)
    loads = {"alive": first.is_alive() or second.is_alive(), "first": first_out, "second": second_out}
    try:
        loop.load_adapter("copy", copy_of_a0)
    except ValueError as err:
        loads["third"] = str(err)
    adapter_slots.load_host_adapter = real
    _, copy = loop.submit(PROMPTS["a0"], "copy", GenerationParams(max_tokens=STEPS, **GREEDY))
    served = _serve(loop, ["a0", None]) | {"copy": _result(copy)}
    names = loop.adapter_names()
    assert loop.shutdown(timeout=60)
    stopped, stopped_out = _in_thread(loop.unload_adapter, "a0")  # the loop is gone: an error, not a wait
    stopped.join(10)
    return before, unloads, loads, served, names, {"alive": stopped.is_alive(), **stopped_out}


@pytest.mark.multi_rank
def test_concurrent_unloads_and_loads_of_one_name_one_wins_the_other_gets_a_conflict(tmp_path):
    from megatron_bdlora.inference.requests import AdapterConflictError

    meg = serve_base(1)
    adapters = write_adapters(tmp_path, meg, 1, ["a0", "a1"])
    copy_of_a0 = shutil.copytree(adapters["a0"], tmp_path / "copy")
    before, unloads, loads, served, names, stopped = run_distributed(
        races_worker, 1, meg, adapters, str(copy_of_a0), timeout=180
    )[0]
    assert unloads["seen"] and not unloads["alive"] and unloads["first"] == {"value": None}
    conflict = unloads["second"]["error"]
    assert isinstance(conflict, AdapterConflictError) and (conflict.name, conflict.operation) == ("a1", "unload")
    assert unloads["running"]["tokens"][:STEPS] == before["a1"]["tokens"]  # the unload waited for it
    assert "'a1' is not loaded" in unloads["third"]
    assert not loads["alive"] and loads["first"] == {"value": None}
    conflict = loads["second"]["error"]
    assert isinstance(conflict, AdapterConflictError) and (conflict.name, conflict.operation) == ("copy", "load")
    assert "already registered" in loads["third"]
    assert names == ["a0", "copy"]
    assert served["copy"] == served["a0"] == before["a0"] and served[None] == before[None]
    assert not stopped["alive"] and isinstance(stopped["error"], RuntimeError), stopped


# ---------------------------------------------------------------------------------------------- hooks
def hooks_worker(info, meg, adapters):
    """lora_info and inflight while requests wait for a slot (stepped by hand), then last_step_at on an idle and on
    a stuck loop, and shutdown's timeout."""
    from megatron_bdlora.inference.requests import GenerationParams

    loop = _loop(info, meg, adapters)
    params = GenerationParams(max_tokens=STEPS, **GREEDY)
    queues = [loop.submit(PROMPTS[a], a, params)[1] for a in ("a0", "a1", "a2", None)]
    out = {"inflight_submitted": loop.inflight()}
    loop.step()
    out["info_step1"] = loop.lora_info()
    while loop.engine.has_unfinished_requests() or loop.waiting:
        loop.step()
    out |= {"info_idle": loop.lora_info(), "inflight_done": loop.inflight(),
            "finished": [_result(q, timeout=1)["finish"] for q in queues]}

    loop.start()
    t0 = loop.last_step_at
    time.sleep(1.2)
    out["idle_age"], out["idle_advanced"] = time.monotonic() - loop.last_step_at, loop.last_step_at > t0
    gate, real = threading.Event(), loop.engine.step_modern

    def stuck(*args, **kwargs):  # a rank hung in a collective, until the gate opens
        gate.wait(60)
        return real(*args, **kwargs)

    loop.engine.step_modern = stuck
    _, q = loop.submit(PROMPTS["a0"], "a0", params)
    time.sleep(1.5)
    out["stuck_age"] = time.monotonic() - loop.last_step_at
    start = time.monotonic()
    out["shutdown_stuck"], out["shutdown_wait"] = loop.shutdown(timeout=0.5), time.monotonic() - start
    gate.set()
    out["shutdown_after"] = loop.shutdown(timeout=60)
    out["drained"] = _result(q, timeout=5)["finish"]
    return out


@pytest.mark.multi_rank
def test_lora_info_inflight_last_step_at_and_shutdown_timeout_follow_the_loop(tmp_path):
    meg = serve_base(1)
    adapters = write_adapters(tmp_path, meg, 1, ["a0", "a1", "a2"])
    out = run_distributed(hooks_worker, 1, meg, adapters, timeout=120)[0]
    assert out["inflight_submitted"] == 4 and out["inflight_done"] == 0
    # a0 was dropped from the host cache (3 adapters, 2 copies): it waits for its read while a1 and a2 start
    assert out["info_step1"] == {"max_lora": 2, "running": ["a1", "a2"], "waiting": ["a0"]}
    assert out["info_idle"] == {"max_lora": 2, "running": [], "waiting": []}
    assert out["finished"] == ["length"] * 4
    assert out["idle_advanced"] and out["idle_age"] < 1.0  # heartbeats every 0.5 s while idle
    assert out["stuck_age"] > 1.0  # what /health and the watchdog read
    assert out["shutdown_stuck"] is False and out["shutdown_wait"] < 2.0
    assert out["shutdown_after"] is True and out["drained"] == "length"


# ---------------------------------------------------------------------------------------------- adapter files
def test_adapter_files_are_read_once_hashed_and_parsed_from_memory(tmp_path):
    import json

    from megatron_bdlora.checkpoint.adapters import AdapterFiles
    from megatron_bdlora.checkpoint.reader import read_adapter
    from megatron_bdlora.inference.adapter_slots import AdapterChangedError, load_host_adapter

    meg = serve_base(1)
    hf_config = json.loads((meg / "config.json").read_text())
    path = Path(write_adapters(tmp_path, meg, 1, ["a0"])["a0"])
    files = AdapterFiles.read(path)
    (path / "notes.txt").write_text("not part of the adapter")
    assert AdapterFiles.read(path).digest == files.digest  # only the adapter's own files count
    want = read_adapter(path, hf_config, 1, "block_diagonal")
    shutil.rmtree(path)
    got = read_adapter(files, hf_config, 1, "block_diagonal")  # from memory: the directory is gone
    assert got.factors.keys() == want.factors.keys()
    assert all(torch.equal(g, w) for k in want.factors for g, w in zip(got.factors[k], want.factors[k]))

    path.mkdir()
    for name, data in files.contents.items():  # written back: the same adapter
        (path / name).write_bytes(data)
    host = load_host_adapter("a0", path, hf_config, 1, 0, "block_diagonal", 16, expected_digest=files.digest)
    assert host.digest == files.digest
    data = bytearray((path / "rank_00.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one factor
    (path / "rank_00.safetensors").write_bytes(bytes(data))
    with pytest.raises(AdapterChangedError) as err:
        load_host_adapter("a0", path, hf_config, 1, 0, "block_diagonal", 16, expected_digest=files.digest)
    changed = AdapterFiles.read(path).digest
    assert str(path) in str(err.value) and files.digest in str(err.value) and changed in str(err.value)



def test_an_adapter_with_non_finite_factors_is_refused_naming_the_tensor(tmp_path):
    """NaN factors would poison the KV blocks of their requests, which later requests reuse: refused at load."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from megatron_bdlora.inference.adapter_slots import load_host_adapter

    meg = serve_base(1)
    hf_config = json.loads((meg / "config.json").read_text())
    path = Path(write_adapters(tmp_path, meg, 1, ["a0"])["a0"])
    assert load_host_adapter("a0", path, hf_config, 1, 0, "block_diagonal", 16).digest
    file = path / "rank_00.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = sorted(tensors)[3]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, file, metadata=metadata)
    with pytest.raises(ValueError, match="non-finite") as err:
        load_host_adapter("a0", path, hf_config, 1, 0, "block_diagonal", 16)
    assert "'a0'" in str(err.value) and str(path) in str(err.value) and "lora_" in str(err.value)
