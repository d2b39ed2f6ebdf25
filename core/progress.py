"""A dependency-free progress bar on stderr (the runtime has no tqdm), with items per second."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, unit: str = "it", stream=None, min_interval: float = 0.2):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self.min_interval = min_interval
        self.enabled = self.stream.isatty() if hasattr(self.stream, "isatty") else False

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.min_interval or self.done == self.total):
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            width = 24
            filled = int(width * self.done / max(self.total, 1))
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
                              f" {rate:.1f} {self.unit}/s")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
