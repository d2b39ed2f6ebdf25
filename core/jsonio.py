"""Reading a JSON file the user handed us: any failure is one user error naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mllm_deploy.core.errors import MllmError


def read_json(path: str | Path, error: type[MllmError], what: str, hint: str = "") -> Any:
    """Parsed JSON of ``path``; raises ``error`` saying the ``what`` file is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {path} as UTF-8 text ({exc}){hint}") from None
    return parse_json(text, error, str(path), hint)


def parse_json(text: str, error: type[MllmError], where: str, hint: str = "") -> Any:
    """``json.loads`` whose every failure (syntax, nesting too deep, an integer of too many digits) is
    one ``error`` naming ``where``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{where} is not valid JSON (nested too deeply){hint}") from None
    except ValueError as exc:  # JSONDecodeError, and int() of a number longer than Python allows
        problem = " ".join(str(exc).split())[:200]
        raise error(f"{where} is not valid JSON ({problem}){hint}") from None
