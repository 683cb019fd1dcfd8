"""A one-line progress display for long jobs: documents, tokens, MB/s, ETA.

On a terminal the line is redrawn in place; in a log (SLURM, CI) a line is
printed every `log_every` seconds so the file stays readable.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_bytes: int, stream=None, log_every: float = 10.0):
        self.total = max(total_bytes, 1)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.monotonic()
        self.every = 0.2 if self.tty else log_every

    def update(self, done_bytes: int, documents: int, tokens: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._draw(done_bytes, documents, tokens, final=False)

    def close(self, done_bytes: int, documents: int, tokens: int) -> None:
        self._draw(done_bytes, documents, tokens, final=True)

    def _draw(self, done_bytes: int, documents: int, tokens: int, final: bool) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done_bytes / elapsed
        fraction = min(done_bytes / self.total, 1.0)
        eta = (self.total - done_bytes) / rate if rate > 0 and not final else 0.0
        width = 24
        bar = "#" * int(fraction * width) + "-" * (width - int(fraction * width))
        line = (f"[{bar}] {fraction:6.1%}  {documents:,} docs  {tokens:,} tokens  "
                f"{rate / 1e6:.1f} MB/s  {'done in' if final else 'ETA'} {_clock(elapsed if final else eta)}")
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
