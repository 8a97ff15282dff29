"""Reading the small JSON files checkpoints carry (configs, manifests), with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: str | Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A JSON object from `path`; FileNotFoundError if absent, `error` if not valid JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object")
    return data
