"""Type-check the TensorRT-calling code against `tensorrt-stubs`, for real.

    python -m clipexport.trt.typecheck            # mypy clipexport/trt clipexport/passes/attention_plugin.py
    python -m clipexport.trt.typecheck PATH...    # other paths

Why a helper instead of plain `mypy`: the `tensorrt-stubs` wheel (10.13.0.35.1) installs
`tensorrt/__init__.pyi` and `tensorrt_bindings/*.pyi` without a `py.typed` marker and
under the runtime package names, so mypy skips them (PEP 561) and every `trt.X` silently
becomes Any; pointed at them directly, mypy then stops at syntax errors in the stubs
(parameters named `in`, a parameter without default after defaulted ones). This copies the
stubs into a temporary directory, repairs exactly those lines, and runs mypy with that
directory on MYPYPATH, so `trt.Builder.no_such_method` is an error as it should be.
Install the stubs with `pip install --no-deps tensorrt-stubs` (their dependencies pull
TensorRT's download stub).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

STUB_PACKAGES = ("tensorrt", "tensorrt_bindings")
DEFAULT_PATHS = ("clipexport/trt", "clipexport/passes/attention_plugin.py")


def _fix_signature_line(line: str) -> str:
    """Repair one `def` line: `in` as a parameter name, and non-default after default parameters."""
    line = re.sub(r"(?<=[(,\s])in(?=\s*:)", "in_", line)
    match = re.match(r"^(\s*def\s+\w+\()(.*)(\)\s*(->.*)?:.*)$", line)
    if not match:
        return line
    head, params, tail = match.group(1), match.group(2), match.group(3)
    out, seen_default, depth, current = [], False, 0, ""
    for ch in params + ",":
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            p = current.strip()
            if p and p not in ("*", "/") and not p.startswith("*"):
                if "=" in p:
                    seen_default = True
                elif seen_default:
                    p = f"{p} = ..."
            out.append(p)
            current = ""
        else:
            current += ch
    return head + ", ".join(x for x in out if x) + tail


def repair_stub(text: str, max_passes: int = 200) -> str:
    """Make a stub file parse, touching only the lines Python reports as syntax errors."""
    lines = text.splitlines()
    for _ in range(max_passes):
        try:
            ast.parse("\n".join(lines), feature_version=(3, 10))
            return "\n".join(lines) + "\n"
        except SyntaxError as exc:
            index = (exc.lineno or 1) - 1
            fixed = _fix_signature_line(lines[index])
            if fixed == lines[index]:
                raise RuntimeError(f"cannot repair stub line {index + 1}: {lines[index].strip()}") from None
            lines[index] = fixed
    raise RuntimeError("too many syntax errors in the stubs")


def prepare_stubs(target: Path, site_packages: Path | None = None) -> Path:
    """Copy and repair the installed TensorRT stubs into target/; return target."""
    site = site_packages or Path(sysconfig.get_paths()["purelib"])
    for package in STUB_PACKAGES:
        source = site / package
        stubs = sorted(source.glob("*.pyi"))
        if not stubs:
            raise SystemExit(f"no TensorRT stubs in {source}: run `pip install --no-deps tensorrt-stubs`")
        (target / package).mkdir(parents=True, exist_ok=True)
        for stub in stubs:
            (target / package / stub.name).write_text(repair_stub(stub.read_text(encoding="utf-8")),
                                                       encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    paths = list(argv if argv is not None else sys.argv[1:]) or list(DEFAULT_PATHS)
    with tempfile.TemporaryDirectory(prefix="clipexport-trt-stubs-") as tmp:
        stubs = prepare_stubs(Path(tmp))
        env = dict(os.environ, MYPYPATH=os.pathsep.join(filter(None, [str(stubs), os.environ.get("MYPYPATH")])))
        return subprocess.run([sys.executable, "-m", "mypy", *paths], env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
