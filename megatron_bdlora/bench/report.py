"""One part of a prepared check (e.g. tools/gpu_check.py): what it found, how long it took, and its tables."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

STATUSES = ("ok", "mismatch", "skipped", "error")


@dataclass
class PartResult:
    """The outcome of one part: `ok`, `mismatch` (a check failed: the run exits non-zero), `skipped` (with why:
    no time left, no GPU, a missing package) or `error` (it raised; the message is in `why`)."""

    name: str
    status: str
    why: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)  # numbers for the JSON report
    markdown: str = ""  # tables for the Markdown report

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"PartResult.status must be one of {STATUSES}, got {self.status!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_part(name: str, fn: Callable[[], PartResult], budget_s: float, min_s: float) -> PartResult:
    """Run one part, skipping it when less than `min_s` of its budget is left and turning a crash into `error`."""
    if budget_s < min_s:
        return PartResult(name, "skipped", f"{budget_s:.0f} s left of the budget, the part needs about {min_s:.0f} s")
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # one broken part must not hide the others' numbers
        result = PartResult(name, "error", f"{type(exc).__name__}: {exc}", data={"traceback": traceback.format_exc()})
    result.seconds = round(time.perf_counter() - start, 1)
    return result
