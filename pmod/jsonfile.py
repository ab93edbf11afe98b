"""Reading the JSON files of a checkpoint directory, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from pmod.errors import PmodError, first_line


def read_json_object(path, fix: str = "", missing: str | None = None) -> dict:
    """The JSON object in ``path``. Errors are one line: ``missing`` (after the path) when the
    file does not exist, else the problem followed by ``fix`` (when given)."""
    path, tail = Path(path), f"; {fix}" if fix else ""
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError as e:
        if missing is None:
            raise PmodError(f"{path}: cannot read ({e.strerror}){tail}") from None
        raise PmodError(f"{path} {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PmodError(f"{path} is not valid JSON ({first_line(e)}){tail}") from None
    except OSError as e:
        raise PmodError(f"{path}: cannot read ({e.strerror}){tail}") from None
    if not isinstance(d, dict):
        raise PmodError(f"{path} must hold a JSON object{tail}")
    return d
