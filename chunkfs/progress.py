"""A one-line progress display for long commands (``chunkfs gc``) on a terminal.

The command passes ``TerminalProgress`` as a ``progress(phase, done, total)`` callback;
it redraws one line of stderr at most ten times a second: a bar when the phase knows its
total, a count when it does not. Nothing is drawn unless stderr is a terminal, so logs
and pipes only get the command's summary.
"""

from __future__ import annotations

import time
from typing import TextIO

PHASES = {
    "list": "listing objects", "mark": "marking namespaces", "manifests": "reading manifests",
    "sweep": "comparing", "publish": "publishing doomed", "reprieve": "re-reading uploads",
    "delete": "deleting",
}
_WIDTH = 30


class TerminalProgress:
    def __init__(self, stream: TextIO, *, interval: float = 0.1) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.interval = interval
        self._last = 0.0
        self._phase = ""
        self._drawn = False

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        finished = total is not None and done >= total
        if phase == self._phase and not finished and now - self._last < self.interval:
            return
        self._last, self._phase = now, phase
        self.stream.write("\r\x1b[K" + render(phase, done, total))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Clear the line (the summary follows on stdout)."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def render(phase: str, done: int, total: int | None) -> str:
    label = f"gc: {PHASES.get(phase, phase):<20}"
    if not total:
        return f"{label} {done:,}"
    share = min(1.0, done / total)
    filled = int(share * _WIDTH)
    return f"{label} [{'#' * filled}{'-' * (_WIDTH - filled)}] {share:4.0%} {done:,}/{total:,}"
