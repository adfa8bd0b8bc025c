"""Progress: a live elapsed-time counter on a terminal, plain lines elsewhere, and a Ctrl-C
during parity that prints one line, not a child process's traceback."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from clipexport import progress as progress_module
from clipexport.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_live_counter_and_clean_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "TICK_SECONDS", 0.05)
    stream = FakeTerminal()
    p = Progress(stream)
    with p.stage("optimize image tower"):
        time.sleep(0.3)
        p.say("    simplify: 80 -> 78 nodes in 0.1s")
        time.sleep(0.2)
    text = stream.getvalue()
    assert "\r\x1b[K  optimize image tower ... 0s" in text  # redrawn in place
    assert text.count("optimize image tower ... 0s") >= 3
    # every plain line starts on a cleared line, never after the counter's text
    assert "\r\x1b[K    simplify: 80 -> 78 nodes in 0.1s\n" in text
    assert text.endswith("\r\x1b[K  optimize image tower: done in 0.5s\n")
    assert not [t for t in threading.enumerate() if t.name.startswith("progress:")]


def test_logs_get_plain_lines_only() -> None:
    stream = io.StringIO()
    with Progress(stream).stage("export image tower"):
        time.sleep(1.2)
    assert stream.getvalue() == "  export image tower ...\n  export image tower: done in 1.2s\n"
    assert not [t for t in threading.enumerate() if t.name.startswith("progress:")]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_ctrl_c_during_parity_prints_one_line_and_leaves_no_child(twin: Callable[[str], str],
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "parent" / "out"
    proc = subprocess.Popen([sys.executable, "-m", "clipexport", "build", twin("vit"), "--pretrained", "none",
                             "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal gives it
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "verify image tower" in line:
            break
    deadline = time.monotonic() + 60
    while not _children(proc.pid) and time.monotonic() < deadline:  # the ONNX Runtime child is up
        time.sleep(0.05)
    children = _children(proc.pid)
    assert children, "no parity child process was seen"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.rstrip().endswith("interrupted: nothing was written")
    time.sleep(0.5)
    assert not [c for c in children if Path(f"/proc/{c}").exists() and "Z" not in
                (Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[0])]
    assert not (tmp_path / "parent").exists() or list((tmp_path / "parent").iterdir()) == []
