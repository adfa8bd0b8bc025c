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


#: Seconds between redraws of the elapsed-time counter on a terminal.
TICK_SECONDS = 1.0


class Progress:
    """One line per stage with its time; on a terminal, also a live elapsed-time counter on the
    line of the stage that is running (redrawn in place), so a stage of minutes is never silent.
    In logs and CI (not a terminal) only the plain lines are written."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()
        self._live: str | None = None  # the counter's text, while one is drawn

    @property
    def interactive(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return not self.quiet and callable(isatty) and bool(isatty())

    def say(self, message: str) -> None:
        if self.quiet:
            return
        with self._lock:
            if self._live is not None:  # clear the counter's line; the next tick redraws it below
                self.stream.write("\r\033[K")
            print(message, file=self.stream, flush=True)

    def _draw(self, text: str | None) -> None:
        with self._lock:
            self.stream.write("\r\033[K" + (text or ""))
            self.stream.flush()
            self._live = text

    def _ticker(self, label: str, start: float, done: threading.Event) -> None:
        while not done.wait(TICK_SECONDS):
            self._draw(f"  {label} ... {time.perf_counter() - start:.0f}s")

    @contextlib.contextmanager
    def stage(self, label: str) -> Iterator[None]:
        """Print `label ...` now and `label: done in Ns` when the block ends."""
        if STOP.is_set():
            raise KeyboardInterrupt
        self.say(f"  {label} ...")
        start = time.perf_counter()
        done = threading.Event()
        ticker = None
        if self.interactive:
            ticker = threading.Thread(target=self._ticker, args=(label, start, done), daemon=True,
                                      name=f"progress: {label}")
            ticker.start()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.timings[label] = round(seconds, 3)
            if ticker is not None:
                done.set()
                ticker.join()
                if self._live is not None:
                    self._draw(None)
                    self._live = None
        if STOP.is_set():
            raise KeyboardInterrupt
        self.say(f"  {label}: done in {seconds:.1f}s")
