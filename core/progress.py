"""A dependency-free progress bar on stderr (the runtime has no tqdm), with items per second, and the one switch
for every bar and informational line: ``MLLM_DEPLOY_PROGRESS`` = ``auto`` (bars on a terminal only), ``always``
(``--progress``: bars even into a pipe or a log file, as plain lines) or ``never`` (``--quiet``: no bars and no
informational lines; errors still print). An environment variable, so bench-mllm's worker processes follow it."""

from __future__ import annotations

import os
import sys
import time

PROGRESS_ENV = "MLLM_DEPLOY_PROGRESS"


def progress_mode() -> str:
    mode = os.environ.get(PROGRESS_ENV, "auto")
    return mode if mode in ("auto", "always", "never") else "auto"


def bars_enabled(stream) -> bool:
    mode = progress_mode()
    if mode != "auto":
        return mode == "always"
    return bool(getattr(stream, "isatty", lambda: False)())


def info(message: str) -> None:
    """An informational line on stderr (what a command is doing), unless --quiet."""
    if progress_mode() != "never":
        print(message, file=sys.stderr, flush=True)


class Progress:
    def __init__(self, total: int, label: str, unit: str = "it", stream=None, min_interval: float = 0.2):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self.min_interval = min_interval
        self.enabled = bars_enabled(self.stream)
        # into a pipe or file (--progress): whole lines, at most one a second, not carriage-return redraws
        self.lines = self.enabled and not bool(getattr(self.stream, "isatty", lambda: False)())
        if self.lines:
            self.min_interval = max(min_interval, 1.0)

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.min_interval or self.done == self.total):
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            width = 24
            filled = int(width * self.done / max(self.total, 1))
            self.stream.write(f"{'' if self.lines else chr(13)}{self.label} [{'#' * filled}{'.' * (width - filled)}]"
                              f" {self.done}/{self.total} {rate:.1f} {self.unit}/s{chr(10) if self.lines else ''}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and not self.lines:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
