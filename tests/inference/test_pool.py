"""AdapterPool bookkeeping: LRU slots and host cache, pinning, counters, failures, determinism (no torch)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_bdlora.inference.pool import AdapterInUseError, AdapterPool

HERE = Path(__file__).resolve().parent  # the subprocess imports this module by name


class Fakes:
    """The three injected callables, recording every call; a fake device maps slot -> what was written there."""

    def __init__(self, bad_paths: tuple[str, ...] = (), flaky: random.Random | None = None) -> None:
        self.calls: list[tuple] = []
        self.bad_paths = set(bad_paths)
        self.flaky = flaky  # if set, every load fails with probability 0.1 (a file deleted, a disk hiccup)
        self.latest: dict[str, tuple] = {}  # name -> the object load_host returned last for it
        self.device: dict[int, tuple] = {}
        self.write_error: Exception | None = None  # raised by write_slot after the slot was half overwritten

    def load_host(self, name: str, path: str) -> tuple:
        self.calls.append(("load", name, path))
        if path in self.bad_paths:
            raise FileNotFoundError(f"no adapter checkpoint at {path}")
        if self.flaky is not None and self.flaky.random() < 0.1:
            raise ValueError(f"{path}: lora_A has shape [3, 7], expected [8, 64]")
        obj = ("host", name, sum(c[0] == "load" for c in self.calls))  # distinct per load
        self.latest[name] = obj
        return obj

    def write_slot(self, slot: int, obj: tuple) -> None:
        self.calls.append(("write", slot, obj[1]))
        if self.write_error is not None:
            self.device[slot] = ("garbage",)
            raise self.write_error
        self.device[slot] = obj

    def clear_slot(self, slot: int) -> None:
        self.calls.append(("clear", slot))
        self.device.pop(slot, None)

    def writes(self) -> list[tuple]:
        return [c for c in self.calls if c[0] == "write"]


def make_pool(max_loras: int, max_cpu_loras: int | None, fakes: Fakes, names: str = "") -> AdapterPool:
    pool = AdapterPool(max_loras, max_cpu_loras, fakes.load_host, fakes.write_slot, fakes.clear_slot)
    for name in names:
        pool.register(name, f"/adapters/{name}")
    return pool


def snapshot(pool: AdapterPool) -> tuple:
    """Everything observable through the public API."""
    return (
        pool.names(),
        {n: pool.slot_of(n) for n in pool.names()},
        {n: pool.pinned(n) for n in pool.names()},
        pool.stats(),
    )


def use(pool: AdapterPool, name: str) -> int | None:
    """One request that starts and finishes."""
    slot = pool.acquire(name)
    if slot is not None:
        pool.release(name)
    return slot


def test_constructor_validates_sizes_like_vllm():
    fakes = Fakes()
    with pytest.raises(ValueError, match=r"max_loras \(0\) must be an integer >= 1"):
        make_pool(0, 4, fakes)
    with pytest.raises(ValueError, match=r"max_cpu_loras \(1\) must be >= max_loras \(2\)"):
        make_pool(2, 1, fakes)
    assert make_pool(3, None, fakes).max_cpu_loras == 3  # vLLM: max_cpu_loras defaults to max_loras


def test_register_loads_once_to_validate_and_keeps_registration_order():
    fakes = Fakes()
    pool = make_pool(2, 4, fakes, "cab")
    assert pool.names() == ["c", "a", "b"]
    assert fakes.calls == [("load", n, f"/adapters/{n}") for n in "cab"]
    assert pool.stats() == {"loads": 0, "evictions": 0, "host_loads": 3, "host_evictions": 0,
                            "resident": 0, "host_cached": 3, "registered": 3}


def test_acquire_fills_lowest_free_slot_from_host_cache_and_pins():
    fakes = Fakes()
    pool = make_pool(2, 2, fakes, "ab")
    assert pool.acquire("b") == 0 and pool.acquire("a") == 1
    assert pool.acquire("b") == 0  # resident: no second write
    assert fakes.writes() == [("write", 0, "b"), ("write", 1, "a")]
    assert fakes.device == {0: fakes.latest["b"], 1: fakes.latest["a"]}
    assert (pool.pinned("a"), pool.pinned("b")) == (1, 2)
    assert pool.stats()["host_loads"] == 2  # written from the host cache, not loaded again


def test_eviction_takes_least_recently_used_and_touches_reorder_it():
    fakes = Fakes()
    pool = make_pool(2, 3, fakes, "abc")
    use(pool, "a"), use(pool, "b"), use(pool, "a")  # a used again after b: b is now the LRU
    assert use(pool, "c") == 1 and pool.slot_of("b") is None
    assert use(pool, "b") == 0 and pool.slot_of("a") is None  # a (last used before c) goes next
    assert [w[1:] for w in fakes.writes()] == [(0, "a"), (1, "b"), (1, "c"), (0, "b")]
    assert pool.stats()["evictions"] == 2


def test_release_counts_as_use_so_a_long_request_keeps_its_adapter_recent():
    pool = make_pool(2, 3, Fakes(), "abc")
    pool.acquire("a"), pool.acquire("b")
    pool.release("b"), pool.release("a")  # a finished last although it started first
    assert pool.acquire("c") == 1 and pool.slot_of("a") == 0


def test_pinned_adapter_is_never_evicted_even_when_least_recently_used():
    fakes = Fakes()
    pool = make_pool(2, 4, fakes, "abcd")
    pool.acquire("a")  # pinned, and the oldest
    use(pool, "b"), use(pool, "c"), use(pool, "d")
    assert pool.slot_of("a") == 0 and pool.pinned("a") == 1
    assert all(w[1] == 1 for w in fakes.writes()[1:])  # b, c, d all took turns in slot 1


def test_acquire_returns_none_while_every_slot_is_pinned_and_succeeds_after_a_release():
    fakes = Fakes()
    pool = make_pool(2, 3, fakes, "abc")
    pool.acquire("a"), pool.acquire("b")
    before, calls = snapshot(pool), list(fakes.calls)
    assert pool.acquire("c") is None
    assert snapshot(pool) == before and fakes.calls == calls  # a busy pool changes nothing
    pool.release("a")
    assert pool.acquire("c") == 0 and pool.slot_of("a") is None and pool.slot_of("b") == 1


def test_host_cache_drops_lru_non_resident_entry_and_reloads_it_on_demand():
    fakes = Fakes()
    pool = make_pool(1, 2, fakes, "ab")
    use(pool, "b")
    pool.register("c", "/adapters/c")  # cache full (a, b): b is resident, so a (not b) is dropped
    assert pool.stats()["host_evictions"] == 1 and pool.stats()["host_cached"] == 2
    first_a = ("host", "a", 1)
    assert use(pool, "a") == 0  # loaded again: b leaves the slot for the host cache as MRU, so c is dropped
    assert fakes.calls[-2:] == [("load", "a", "/adapters/a"), ("write", 0, "a")]
    assert fakes.device[0] == fakes.latest["a"] != first_a
    assert pool.stats() == {"loads": 2, "evictions": 1, "host_loads": 4, "host_evictions": 2,
                            "resident": 1, "host_cached": 2, "registered": 3}
    use(pool, "b")  # b stayed in the host cache
    assert fakes.calls[-1] == ("write", 0, "b") and pool.stats()["host_loads"] == 4
    use(pool, "c")
    assert fakes.calls[-2] == ("load", "c", "/adapters/c")


def test_acquire_with_a_host_copy_read_ahead_places_it_without_reading():
    """Overlap loading: the serving loop reads an uncached adapter in the background and hands the copy in."""
    fakes = Fakes()
    pool = make_pool(1, 2, fakes, "abc")  # a was dropped from the host cache when c was registered
    assert [pool.cached(n) for n in "abc"] == [False, True, True]
    calls = list(fakes.calls)
    read_ahead = ("host", "a", "prefetched")
    assert pool.acquire("a", host=read_ahead) == 0
    assert fakes.calls == calls + [("write", 0, "a")] and fakes.device[0] is read_ahead  # no load_host call
    assert pool.cached("a") and pool.stats()["host_loads"] == 4 and pool.stats()["host_cached"] == 2
    pool.release("a")
    assert pool.cached("c") and not pool.cached("b")  # b, the LRU entry, made room for a
    assert pool.acquire("c", host=("host", "c", "ignored")) == 0  # cached: the cache's own copy is used
    assert fakes.device[0] == ("host", "c", 3)


def test_registering_many_adapters_keeps_at_most_max_cpu_loras_host_copies():
    fakes = Fakes()
    pool = make_pool(2, 3, fakes, "abcdefghij")
    assert pool.stats()["host_cached"] == 3 and [n for n in pool.names() if pool.cached(n)] == ["h", "i", "j"]
    assert sum(c[0] == "load" for c in fakes.calls) == 10  # each read once, to validate it


def test_register_drops_host_copy_when_every_cached_adapter_is_resident():
    fakes = Fakes()
    pool = make_pool(1, 1, fakes, "a")
    pool.acquire("a")
    pool.register("b", "/adapters/b")  # validated, but nothing non-resident can make room for it
    assert pool.stats()["host_cached"] == 1 and pool.stats()["host_evictions"] == 0
    assert pool.acquire("b") is None
    pool.release("a")
    assert pool.acquire("b") == 0
    assert fakes.calls[-2:] == [("load", "b", "/adapters/b"), ("write", 0, "b")]
    assert pool.stats()["host_evictions"] == 1  # a, back from its slot, made room for b


def test_counters_are_exact_for_a_scripted_sequence():
    fakes = Fakes()
    pool = make_pool(2, 3, fakes, "abcd")  # 4 host loads; d's registration drops a from the host cache
    pool.acquire("a")  # reload a (host_evictions: b), load slot 0
    pool.acquire("c")  # slot 1
    pool.acquire("a")  # resident: pin only
    pool.release("c")
    assert pool.acquire("b") == 1  # reload b (drops d), evict c
    pool.release("a"), pool.release("a"), pool.release("b")
    pool.unregister("c")
    assert pool.acquire("d") == 0  # reload d, evict a (LRU); nothing to drop: the cache has room after c left
    assert pool.stats() == {"loads": 4, "evictions": 2, "host_loads": 7, "host_evictions": 3,
                            "resident": 2, "host_cached": 3, "registered": 3}
    assert [c for c in fakes.calls if c[0] != "load"] == [
        ("write", 0, "a"), ("write", 1, "c"), ("write", 1, "b"), ("write", 0, "d")]
    assert [c[1] for c in fakes.calls if c[0] == "load"] == list("abcdabd")


def test_unregister_in_use_raises_naming_adapter_and_requests_and_changes_nothing():
    fakes = Fakes()
    pool = make_pool(2, 2, fakes, "ab")
    pool.acquire("a"), pool.acquire("a")
    before, calls = snapshot(pool), list(fakes.calls)
    with pytest.raises(AdapterInUseError, match=r"adapter 'a' is in use by 2 in-flight request") as err:
        pool.unregister("a")
    assert isinstance(err.value, RuntimeError) and (err.value.name, err.value.in_flight) == ("a", 2)
    assert snapshot(pool) == before and fakes.calls == calls
    pool.release("a"), pool.release("a")
    pool.unregister("a")
    assert pool.names() == ["b"]


def test_unregister_clears_the_slot_and_frees_it_for_the_next_adapter():
    fakes = Fakes()
    pool = make_pool(1, 2, fakes, "ab")
    use(pool, "a")
    pool.unregister("a")
    assert fakes.calls[-1] == ("clear", 0) and fakes.device == {}
    assert pool.stats()["resident"] == 0 and pool.stats()["host_cached"] == 1
    assert pool.acquire("b") == 0 and pool.stats()["evictions"] == 0
    calls = list(fakes.calls)
    pool.register("c", "/adapters/c2")
    pool.unregister("c")  # not resident: no slot to clear
    assert fakes.calls == calls + [("load", "c", "/adapters/c2")]
    pool.register("a", "/adapters/a")  # the name is free again
    assert pool.names() == ["b", "a"] and pool.slot_of("a") is None


class AlwaysFails:
    def random(self) -> float:
        return 0.0


@pytest.mark.parametrize("path, error", [("/adapters/missing", FileNotFoundError), ("/adapters/x", ValueError)])
def test_register_with_failing_load_host_propagates_and_leaves_the_pool_unchanged(path, error):
    fakes = Fakes(bad_paths=("/adapters/missing",))
    pool = make_pool(1, 1, fakes, "a")
    use(pool, "a")
    before = snapshot(pool)
    fakes.flaky = AlwaysFails() if error is ValueError else None  # a checkpoint with a wrong shape
    with pytest.raises(error, match=path):
        pool.register("x", path)
    assert snapshot(pool) == before
    with pytest.raises(KeyError):
        pool.acquire("x")


def test_failing_reload_in_acquire_propagates_and_leaves_the_pool_unchanged():
    fakes = Fakes()
    pool = make_pool(1, 1, fakes, "a")
    use(pool, "a")
    pool.register("b", "/adapters/b")  # dropped: a is resident and the cache holds one entry
    fakes.bad_paths.add("/adapters/b")  # the checkpoint was deleted since
    before = snapshot(pool)
    with pytest.raises(FileNotFoundError, match="/adapters/b"):
        pool.acquire("b")
    assert snapshot(pool) == before and fakes.device == {0: fakes.latest["a"]}


def test_failing_slot_write_leaves_the_slot_free_and_the_adapter_not_resident():
    fakes = Fakes()
    pool = make_pool(1, 2, fakes, "ab")
    use(pool, "a")
    fakes.write_error = RuntimeError("CUDA out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        pool.acquire("b")
    # a's weights may be half overwritten, so it is no longer resident either
    assert (pool.slot_of("a"), pool.slot_of("b"), pool.pinned("b")) == (None, None, 0)
    assert pool.stats()["resident"] == 0
    fakes.write_error = None
    assert pool.acquire("a") == 0 and fakes.device[0] is fakes.latest["a"]


def test_duplicate_and_empty_names_are_rejected():
    pool = make_pool(1, 1, Fakes(), "a")
    with pytest.raises(ValueError, match="'a' is already registered"):
        pool.register("a", "/elsewhere")
    with pytest.raises(ValueError, match="non-empty string"):
        pool.register("", "/adapters/x")
    assert pool.names() == ["a"]


@pytest.mark.parametrize("method", ["unregister", "acquire", "release", "slot_of", "pinned"])
def test_unknown_names_raise_key_error(method):
    pool = make_pool(1, 1, Fakes(), "a")
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        getattr(pool, method)("nope")


def test_release_without_acquire_raises():
    pool = make_pool(1, 1, Fakes(), "a")
    pool.acquire("a"), pool.release("a")
    with pytest.raises(RuntimeError, match="not pinned"):
        pool.release("a")


def run_random_sequence(seed: int, fakes: Fakes | None = None, check: bool = False) -> list[tuple]:
    """A seeded random call sequence against a pool; with check=True, the invariants after every call."""
    rng = random.Random(seed)
    max_loras = rng.randint(1, 3)
    max_cpu = max_loras + rng.randint(0, 2)
    fakes = fakes or Fakes(bad_paths=("/adapters/bad",), flaky=random.Random(seed + 1))
    pool = make_pool(max_loras, max_cpu, fakes)
    names = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    held: dict[str, int] = {}  # the caller's own count of its in-flight requests
    outcomes: list[tuple] = []
    for _ in range(60):
        op = rng.choice(["register", "acquire", "acquire", "release", "unregister"])
        known = [n for n in names if held.get(n)] if op == "release" else pool.names()
        name = rng.choice(known) if known and op != "register" and rng.random() < 0.9 else rng.choice(names)
        before = snapshot(pool)
        try:
            if op == "register":
                result = pool.register(name, "/adapters/bad" if rng.random() < 0.2 else f"/adapters/{name}")
            else:
                result = getattr(pool, op)(name)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
            outcomes.append((op, name, type(exc).__name__))
            if check:
                assert snapshot(pool) == before, (op, name, exc)  # a refused or failed call changes nothing
            continue
        outcomes.append((op, name, result))
        if op == "acquire" and result is not None:
            held[name] = held.get(name, 0) + 1
        elif op == "release":
            held[name] -= 1
        if op == "acquire" and result is None and check:
            assert sorted(pool.pinned(n) > 0 for n in pool.names() if pool.slot_of(n) is not None) == [True] * max_loras
        if check:
            check_invariants(pool, fakes, held, max_loras, max_cpu)
    return outcomes


def check_invariants(pool: AdapterPool, fakes: Fakes, held: dict[str, int], max_loras: int, max_cpu: int) -> None:
    slots = {n: pool.slot_of(n) for n in pool.names()}
    resident = {n: s for n, s in slots.items() if s is not None}
    stats = pool.stats()
    assert len(resident) <= max_loras and stats["resident"] == len(resident)
    assert len(set(resident.values())) == len(resident)  # injective: one adapter per slot
    assert all(0 <= s < max_loras for s in resident.values())
    assert {n: pool.pinned(n) for n in pool.names() if pool.pinned(n)} == {n: c for n, c in held.items() if c}
    assert all(n in resident for n, c in held.items() if c)  # pinned adapters are resident
    assert stats["host_cached"] <= max_cpu and stats["registered"] == len(pool.names())
    assert stats["resident"] <= stats["host_cached"]  # a resident adapter keeps its host entry (as in vLLM)
    for n, s in resident.items():  # what the device computes with is what load_host last returned for n
        assert fakes.device[s] is fakes.latest[n]


def test_invariants_hold_over_random_call_sequences():
    for seed in range(300):
        run_random_sequence(seed, check=True)


def test_two_pools_fed_the_same_calls_make_identical_slot_writes():
    logs = []
    for _ in range(2):
        fakes = Fakes(bad_paths=("/adapters/bad",), flaky=random.Random(7))
        outcomes = [run_random_sequence(seed, fakes) for seed in range(20)]
        logs.append((outcomes, fakes.calls))
    assert logs[0] == logs[1] and any(c[0] == "write" for c in logs[0][1])


def test_decisions_do_not_depend_on_the_string_hash_seed():
    """TP ranks are separate processes, each with its own PYTHONHASHSEED: set order must never leak in."""
    script = ("import json, test_pool as t; f = t.Fakes(bad_paths=('/adapters/bad',)); "
              "o = [t.run_random_sequence(s, f) for s in range(30)]; print(json.dumps([o, f.calls]))")
    out = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run([sys.executable, "-c", script], cwd=HERE, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out.append(json.loads(proc.stdout))
    assert out[0] == out[1]
