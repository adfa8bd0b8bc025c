"""Progress of long work, one line per stage with its time, on stderr."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator, TextIO

# Set when the user asked the work to stop (SIGTERM). The signal handler raises KeyboardInterrupt
# at once, but a library may catch it (or turn it into its own error) mid-stage; every stage
# boundary then raises it again, so the build still stops and cleans up.
STOP = threading.Event()


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
        if STOP.is_set():
            raise KeyboardInterrupt
        self.say(f"  {label} ...")
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.timings[label] = round(seconds, 3)
        if STOP.is_set():
            raise KeyboardInterrupt
        self.say(f"  {label}: done in {seconds:.1f}s")
