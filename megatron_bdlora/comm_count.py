"""Count torch.distributed collectives issued inside a block (tests and benchmarks audit communication)."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from typing import Iterator

import torch.distributed as dist

_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "all_to_all_single",
)
# megatron binds these at import time, so patching torch.distributed alone would miss them
_MEGATRON_ALIASES = ("dist_all_gather_func", "dist_reduce_scatter_func")
_MEGATRON_MODULES = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.utils",
)


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Yield a Counter {collective name: calls} filled while the block runs (all groups)."""
    counts: Counter = Counter()
    originals: list[tuple[object, str, object]] = []

    def wrap(owner: object, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def counted(*args, **kwargs):
            counts[label] += 1
            return fn(*args, **kwargs)

        originals.append((owner, attr, fn))
        setattr(owner, attr, counted)

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            wrap(dist, name, name)
    for mod_name in _MEGATRON_MODULES:
        mod = sys.modules.get(mod_name)
        for alias in _MEGATRON_ALIASES:
            if mod is not None and hasattr(mod, alias):
                label = "all_gather_into_tensor" if "gather" in alias else "reduce_scatter_tensor"
                wrap(mod, alias, label)
    try:
        yield counts
    finally:
        for owner, attr, fn in reversed(originals):
            setattr(owner, attr, fn)
