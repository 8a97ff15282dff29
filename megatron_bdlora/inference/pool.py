"""Which adapters sit in the device slots and in the host cache: the bookkeeping of a multi-adapter pool.

Like vLLM's LRU LoRA manager (and S-LoRA's adapter cache): `max_loras` device slots hold the adapters a batch
can use, a host cache of `max_cpu_loras` entries keeps loaded adapters ready to copy in, and requests pin the
adapter they use so that it is never evicted under them. Loading, copying into a slot and clearing a slot are
injected callables, so this module holds no torch and does no file I/O.

Every tensor-parallel rank runs its own copy of the pool and is fed the same calls, so every decision is a pure
function of the call sequence: recency is a logical clock, ties cannot happen, and no set is ever iterated.
"""

from __future__ import annotations

from typing import Any, Callable


class AdapterInUseError(RuntimeError):
    """unregister() of an adapter that in-flight requests still hold (the server answers 409 with it)."""

    def __init__(self, name: str, in_flight: int) -> None:
        super().__init__(
            f"adapter {name!r} is in use by {in_flight} in-flight request(s); unload it after they finish"
        )
        self.name = name
        self.in_flight = in_flight


class AdapterPool:
    """Device slots and a host cache of adapters, both least-recently-used, with pinning by in-flight requests.

    Invariants: a pinned adapter is resident; every resident adapter also has a host cache entry (as in vLLM,
    where the active adapters are a subset of the registered ones), so the host cache holds at most
    `max_cpu_loras` entries and a resident adapter's entry is never dropped.
    """

    def __init__(
        self,
        max_loras: int,
        max_cpu_loras: int | None,
        load_host: Callable[[str, str], Any],
        write_slot: Callable[[int, Any], None],
        clear_slot: Callable[[int], None],
    ) -> None:
        # vLLM's LoRAConfig checks: max_loras >= 1; max_cpu_loras defaults to max_loras, may not be smaller
        if not isinstance(max_loras, int) or max_loras < 1:
            raise ValueError(f"max_loras ({max_loras!r}) must be an integer >= 1")
        if max_cpu_loras is None:
            max_cpu_loras = max_loras
        elif not isinstance(max_cpu_loras, int) or max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras!r}) must be >= max_loras ({max_loras})")
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self._load_host, self._write_slot, self._clear_slot = load_host, write_slot, clear_slot
        self._paths: dict[str, str] = {}  # name -> path, in registration order
        self._host: dict[str, Any] = {}  # host cache: name -> what load_host returned
        self._slots: list[str | None] = [None] * max_loras  # slot -> resident adapter
        self._slot_of: dict[str, int] = {}
        self._pins: dict[str, int] = {}  # name -> in-flight requests (only names with > 0)
        self._last_used: dict[str, int] = {}  # name -> logical time of last use; orders both LRUs
        self._clock = 0
        self._counts = {"loads": 0, "evictions": 0, "host_loads": 0, "host_evictions": 0}

    def register(self, name: str, path: str) -> None:
        """Add an adapter, loading it once now so that a bad path or checkpoint fails here, not mid-request."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._paths:
            raise ValueError(f"adapter {name!r} is already registered (from {self._paths[name]})")
        host_obj = self._load_host(name, path)  # may raise: nothing has changed yet
        self._counts["host_loads"] += 1
        self._paths[name] = path
        self._touch(name)
        self._cache_host(name, host_obj)

    def unregister(self, name: str) -> None:
        """Forget an adapter and free its slot; refused while requests use it (the caller aborts or waits)."""
        self._check(name)
        if self._pins.get(name, 0):
            raise AdapterInUseError(name, self._pins[name])
        if name in self._slot_of:
            self._clear_slot(self._slot_of[name])  # before any change: if it raises, the pool is as it was
            self._slots[self._slot_of.pop(name)] = None
        self._host.pop(name, None)
        self._last_used.pop(name)
        del self._paths[name]

    def acquire(self, name: str, host: Any = None) -> int | None:
        """Pin the adapter in a device slot for a request about to start; None if every slot is pinned (retry).

        `host`: a host copy the caller read ahead (overlap loading), used if the cache has none, so that no read
        happens here; without it an uncached adapter is read now, synchronously."""
        self._check(name)
        if name in self._slot_of:
            self._pin(name)
            return self._slot_of[name]
        slot, victim = self._free_or_victim_slot()
        if slot is None:
            return None
        reload = name not in self._host
        if reload:  # dropped from the host cache earlier: load it again (may raise; nothing has changed yet)
            host_obj = self._load_host(name, self._paths[name]) if host is None else host
            self._counts["host_loads"] += 1
        else:
            host_obj = self._host[name]
        if victim is not None:
            del self._slot_of[victim]
            self._slots[slot] = None
            self._counts["evictions"] += 1
            self._touch(victim)  # back to the host cache as its most recently used entry
        if reload:
            kept = self._cache_host(name, host_obj)
            assert kept, "resident < max_loras <= max_cpu_loras here, so a non-resident entry can be dropped"
        self._write_slot(slot, host_obj)  # if it raises, the slot stays free and the adapter not resident
        self._slots[slot] = name
        self._slot_of[name] = slot
        self._counts["loads"] += 1
        self._pin(name)
        return slot

    def release(self, name: str) -> None:
        """Unpin once, when a request finishes; the adapter stays resident until its slot is needed."""
        self._check(name)
        if not self._pins.get(name, 0):
            raise RuntimeError(f"release({name!r}) without a matching acquire: the adapter is not pinned")
        self._pins[name] -= 1
        if not self._pins[name]:
            del self._pins[name]
        self._touch(name)  # recency = last time it served a request (vLLM touches it every step it is active)

    def cached(self, name: str) -> bool:
        """Whether acquire() can place the adapter without reading it (resident or in the host cache)."""
        self._check(name)
        return name in self._host

    def path(self, name: str) -> str:
        """Where the adapter was registered from (what a read ahead of acquire() reads)."""
        self._check(name)
        return self._paths[name]

    def slot_of(self, name: str) -> int | None:
        """The device slot holding the adapter, or None if it is not resident."""
        self._check(name)
        return self._slot_of.get(name)

    def names(self) -> list[str]:
        """Registered adapters, in registration order."""
        return list(self._paths)

    def pinned(self, name: str) -> int:
        """How many in-flight requests hold the adapter."""
        self._check(name)
        return self._pins.get(name, 0)

    def stats(self) -> dict[str, int]:
        """Counters for logs and /metrics: slot writes, slot evictions, host loads and drops, current sizes."""
        return {
            **self._counts,
            "resident": len(self._slot_of),
            "host_cached": len(self._host),
            "registered": len(self._paths),
        }

    def _check(self, name: str) -> None:
        if name not in self._paths:
            raise KeyError(f"unknown adapter {name!r}; registered: {sorted(self._paths)}")

    def _touch(self, name: str) -> None:
        self._clock += 1
        self._last_used[name] = self._clock

    def _pin(self, name: str) -> None:
        self._pins[name] = self._pins.get(name, 0) + 1
        self._touch(name)

    def _free_or_victim_slot(self) -> tuple[int | None, str | None]:
        """The lowest free slot, else the slot of the least recently used unpinned adapter, else (None, None)."""
        if None in self._slots:
            return self._slots.index(None), None
        unpinned = [n for n in self._slots if n not in self._pins]
        if not unpinned:
            return None, None
        victim = min(unpinned, key=self._last_used.__getitem__)
        return self._slot_of[victim], victim

    def _cache_host(self, name: str, host_obj: Any) -> bool:
        """Keep host_obj, dropping the least recently used non-resident entry if full; False if all are resident."""
        if len(self._host) >= self.max_cpu_loras:
            droppable = [n for n in self._host if n not in self._slot_of]  # pinned implies resident
            if not droppable:
                return False  # not kept: acquire() loads it again when it is needed
            del self._host[min(droppable, key=self._last_used.__getitem__)]
            self._counts["host_evictions"] += 1
        self._host[name] = host_obj
        return True
