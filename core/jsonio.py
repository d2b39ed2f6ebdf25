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
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}){hint}") from None
