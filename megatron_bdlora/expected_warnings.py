"""The megatron-core / DeepSpeed warnings that are expected in this project and carry nothing actionable."""

from __future__ import annotations

import warnings

_EXPECTED_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "When using async grad allreduce it is recommended",
    "Apex is not installed. Falling back to Torch Norm",
    "full scope is deprecated. Use empty cuda_graph_scope",
    r"`torch\.distributed\.\w+` is deprecated",
)


def silence_expected_warnings() -> None:
    """Hide the warnings listed above (process-wide), so real ones stand out in run logs."""
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
