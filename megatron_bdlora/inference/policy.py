"""What the HTTP server lets a caller do: the API key, runtime adapter loading and its roots, size and queue limits,
and the engine liveness bounds, with the defaults `serve --help` and the README list.

Free of FastAPI and megatron-core, so that the server's command line reads the defaults before anything heavy loads.
Defaults follow TGI where it has one (2 MB body, 4 stop sequences, 128 requests in flight) and vLLM for the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

API_KEY_ENV = "MEGATRON_BDLORA_API_KEY"  # read when --api-key is not given (as vLLM reads VLLM_API_KEY)
MIN_TEMPERATURE = 0.01  # vLLM's floor: 0 < temperature < 0.01 is raised to it (logits / t overflows below)


@dataclass(frozen=True)
class ServerPolicy:
    """Limits and permissions of one server (one per process; built by serve.py from its flags)."""

    api_key: str | None = None  # None: open, as vLLM without --api-key
    enable_lora_runtime_updating: bool = False  # the load/unload routes answer 404 unless on
    lora_roots: tuple[str, ...] = ()  # () with runtime updating on: any path (vLLM's behaviour)
    max_request_bytes: int = 2_000_000  # TGI's payload limit
    max_queued_requests: int = 128  # engine requests (prompts x n) tokenised, queued or running (TGI's default)
    max_stop_sequences: int = 4  # TGI's max_stop_sequences
    max_stop_length: int = 256  # characters per stop string: each is held back from a stream until ruled out
    max_stop_token_ids: int = 64
    engine_step_timeout: float = 30.0  # seconds without a finished engine step before /health answers 503
    engine_dead_timeout: float = 120.0  # seconds without one before the server exits non-zero (a rank hung)


def api_key_from(flag_value: str | None) -> str | None:
    """The key to require: the flag's, else the environment's; an empty one means none."""
    key = flag_value if flag_value is not None else os.environ.get(API_KEY_ENV)
    return key or None


def under_roots(path: str, roots: tuple[str, ...]) -> Path | None:
    """`path` with symlinks and `..` resolved, if that lies inside one of `roots` (resolved alike); else None.

    The caller refuses None with one message whatever the reason, so a refusal never tells whether a path exists.
    With no roots every path is allowed (returned resolved).
    """
    resolved = Path(path).expanduser().resolve()
    if not roots:
        return resolved
    for root in roots:
        if resolved.is_relative_to(Path(root).expanduser().resolve()):
            return resolved
    return None


def files_under_roots(directory: Path, roots: tuple[str, ...]) -> bool:
    """Whether every entry of an allowed adapter directory also resolves inside a root (a file that is a symlink to
    outside would otherwise be read through an allowed directory)."""
    if not roots or not directory.is_dir():
        return True
    return all(under_roots(str(entry), roots) is not None for entry in directory.iterdir())
