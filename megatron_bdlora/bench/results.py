"""Writing a benchmark's or experiment's result as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron_bdlora.atomic import atomic_write_text


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Indented JSON, written atomically (a rename), so an interrupted run never leaves half a result."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")
