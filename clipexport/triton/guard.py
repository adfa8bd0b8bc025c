"""A small guard process between us and tritonserver: `python -I guard.py CMD...`.

Why: tritonserver starts one Python-backend stub process per model instance. When tritonserver
dies without unloading its models (SIGKILL, or killed because the process that started it died)
the stubs live on as orphans, each holding a copy of a tower in memory. The guard runs CMD in a
session of its own and, whatever way it ends, kills that whole session:

    SIGTERM / SIGINT         forwarded to CMD (tritonserver's own graceful stop)
    SIGUSR1                  SIGKILL to CMD's session, then exit at once (137)
    its parent dies          the same (PR_SET_PDEATHSIG delivers SIGUSR1 to the guard)
    CMD exits                leftovers of its session get SIGKILL; the guard exits with CMD's status

Run as a script with -I (no site, no PYTHONPATH): it imports only the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: guard.py PARENT_PID CMD...", file=sys.stderr)
        return 2
    parent, command = int(argv[0]), argv[1:]
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGUSR1)  # PR_SET_PDEATHSIG
    child = subprocess.Popen(command, start_new_session=True)

    def kill_all(signum: int = 0, frame: object = None) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        os._exit(137)

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    signal.signal(signal.SIGUSR1, kill_all)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        kill_all()
    status = child.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)  # stubs that outlived tritonserver
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
