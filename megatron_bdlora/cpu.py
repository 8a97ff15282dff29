"""The few megatron-core shims needed to run on CPU (gloo), in one place; applied only without CUDA.

megatron-core allocates some buffers on `torch.cuda.current_device()` and keeps a CUDA RNG tracker for
dropout in TP regions. On a CPU-only machine both are redirected to CPU; on GPUs nothing here runs.
"""

from __future__ import annotations

import contextlib

import torch

_applied = False


def apply_cpu_shims(seed: int) -> bool:
    """Make megatron-core usable without CUDA; returns whether shims were applied (False on GPU hosts)."""
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        # GlobalMemoryBuffer, RoPE and the all-gather buffers allocate on current_device().
        torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
        _applied = True
    _init_cpu_rng_tracker(seed)
    return True


class _CpuRNGStatesTracker:
    """Drop-in for megatron's CUDA RNG tracker: named CPU generator states forked around TP-region ops."""

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.states_ = {}

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def add(self, name: str, seed: int) -> None:
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    def fork(self, name: str = "model-parallel-rng"):
        @contextlib.contextmanager
        def _fork():
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

        return _fork()


def _init_cpu_rng_tracker(seed: int) -> None:
    """Install a CPU tracker seeded like megatron's (data-parallel state + per-TP-rank model-parallel state)."""
    # lazy, as in parallel.py (which imports this module): megatron-core takes seconds to import
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mpu_random

    tracker = _CpuRNGStatesTracker()
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    tracker.add(mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mpu_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    mpu_random._CUDA_RNG_STATE_TRACKER = tracker
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
