"""Progress of long work, one line per stage with its time, on stderr."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.timings: dict[str, float] = {}

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, label: str) -> Iterator[None]:
        """Print `label ...` now and `label: done in Ns` when the block ends."""
        self.say(f"  {label} ...")
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.timings[label] = round(seconds, 3)
        self.say(f"  {label}: done in {seconds:.1f}s")
