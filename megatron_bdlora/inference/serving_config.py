"""What a server runs, and the serving defaults `python -m megatron_bdlora.serve --help` shows.

A module of its own, free of megatron-core, so the server's command line reads the defaults (and checks its
flags) before the engine's imports load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServingConfig:
    """What a server runs: base checkpoint, sharding mode, adapters, pool and engine sizes."""

    megatron_dir: Path
    mode: str = "block_diagonal"
    adapters: dict[str, str] = field(default_factory=dict)
    max_loras: int = 4
    max_cpu_loras: int | None = None
    max_lora_rank: int = 64
    max_model_len: int = 2048
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    kv_cache_gb: float = 0.5
    block_size: int = 64
    dtype: str = "float32"
    seed: int = 0
    cuda_graphs: bool = False  # decode steps replayed from megatron's CUDA graphs (GPU only)
