"""Reading the JSON files of checkpoints, configs and runs, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: str | Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` naming the file if it is missing, not JSON, or
    not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"file not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{path} is a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def check_unicode(text: str, what: str, error: type[Exception] = ValueError) -> None:
    """``error`` ("``what`` is not valid Unicode (...)") when ``text`` holds a lone surrogate:
    JSON's \\ud800-style escapes decode to them, and no tokenizer encodes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise error(f"{what} is not valid Unicode ({err.reason} at character {err.start})") from None


def read_jsonl(path: str | Path, error: type[Exception] = ValueError) -> list[tuple[int, Any]]:
    """(line number, value) of each non-empty line of the JSON Lines file ``path``; ``error``
    naming the file (and line) if it is unreadable or a line is not JSON."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # (not splitlines(): see training.data)
    except FileNotFoundError:
        raise error(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"cannot read {path}: {err}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise error(f"{path}:{n}: not JSON: {err}") from None
    return out
