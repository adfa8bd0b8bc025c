"""The TensorRT-calling code type-checks against tensorrt-stubs, and the check is real:
an API misuse is caught (plain `mypy` would see TensorRT as Any; see clipexport.trt.typecheck)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from clipexport.trt.typecheck import _fix_signature_line, repair_stub

ROOT = Path(__file__).resolve().parents[1]
_STUBS = (Path(sysconfig.get_paths()["purelib"]) / "tensorrt_bindings" / "tensorrt.pyi").is_file()
_MYPY = importlib.util.find_spec("mypy") is not None


def test_stub_repair_fixes_only_what_does_not_parse():
    assert _fix_signature_line("    def f(self, in: list[int], out: int) -> int:") == \
        "    def f(self, in_: list[int], out: int) -> int:"
    assert _fix_signature_line("    def g(self, a: int = None, b: int) -> None:") == \
        "    def g(self, a: int = None, b: int = ...) -> None:"
    text = "class A:\n    def ok(self, x: int) -> int: ...\n    def bad(self, in: int) -> int: ...\n"
    fixed = repair_stub(text)
    assert "def ok(self, x: int) -> int: ..." in fixed and "in_: int" in fixed
    with pytest.raises(RuntimeError, match="cannot repair"):
        repair_stub("x = = 1\n")


@pytest.mark.skipif(not (_STUBS and _MYPY), reason="needs mypy and `pip install --no-deps tensorrt-stubs`")
def test_trt_package_typechecks_and_misuse_is_caught(tmp_path):
    bad = tmp_path / "misuse.py"
    bad.write_text(
        "import tensorrt as trt\n\n"
        "def f(config: trt.IBuilderConfig) -> None:\n"
        "    config.set_memory_pool_limit('workspace', 1)\n"
        "    trt.Builder(trt.Logger()).no_such_method()\n"
    )
    run = [sys.executable, "-m", "clipexport.trt.typecheck"]
    caught = subprocess.run([*run, str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert caught.returncode == 1, caught.stdout + caught.stderr
    assert "set_memory_pool_limit" in caught.stdout and "no_such_method" in caught.stdout
    ours = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert ours.returncode == 0, ours.stdout + ours.stderr
