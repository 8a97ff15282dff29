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
    return parse_json_object(path.read_bytes(), path, error)


def parse_json_object(data: bytes, source: str | Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A JSON object from the bytes of file `source` (already read); `error` naming it if not valid JSON or not an
    object."""
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{source} is not valid JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise error(f"{source} is not a JSON object")
    return parsed
