"""A small tqdm-style progress bar for the CLI, fed by the samplers' step callback."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, total: int, desc: str = "", stream=None, width: int = 28):
        self.total, self.desc, self.width = total, desc, width
        self.stream = stream or sys.stderr
        self.count = 0
        self.start = time.perf_counter()
        self.enabled = self.stream.isatty() if hasattr(self.stream, "isatty") else False
        self._draw()  # at 0 at once: the first step of a large batch can take minutes

    def update(self, n: int = 1, **postfix) -> None:
        self.count = min(self.total, self.count + n)
        self._draw(postfix)

    def close(self) -> None:
        if self.count == 0:  # nothing ran (e.g. the input was refused): leave no bar behind the error
            if self.enabled:
                self.stream.write("\r" + " " * len(self._line({})) + "\r")
                self.stream.flush()
            return
        if self.enabled:
            self.stream.write("\n")
        else:  # logs and pipes get one summary line instead of carriage returns
            self.stream.write(self._line({}) + "\n")
        self.stream.flush()

    def _line(self, postfix: dict) -> str:
        elapsed = time.perf_counter() - self.start
        done = int(self.width * self.count / max(self.total, 1))
        bar = "█" * done + " " * (self.width - done)
        rate = self.count / elapsed if elapsed > 0 else 0.0
        speed = f"{rate:.2f} it/s" if rate >= 1 or rate == 0 else f"{1 / rate:.2f} s/it"
        extra = "".join(f", {k}={v:.4g}" if isinstance(v, float) else f", {k}={v}" for k, v in postfix.items())
        return f"{self.desc}{self.count}/{self.total} |{bar}| {elapsed:.1f}s, {speed}{extra}"

    def _draw(self, postfix: dict | None = None) -> None:
        if self.enabled:
            self.stream.write("\r" + self._line(postfix or {}))
            self.stream.flush()
