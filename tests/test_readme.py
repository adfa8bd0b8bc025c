"""The README's first-screen commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_first_screen_has_install_and_build_then_tests():
    install, tests = (block.strip() for block in _bash_blocks()[:2])
    assert 'pip install -e ".[dev]"' in install and "clipexport build ViT-B-32 --pretrained none" in install
    assert tests.startswith("python -m pytest")
    # the first screen: both commands within the first 30 lines
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:30])
    assert install in head and tests in head


def test_ci_runs_the_readme_test_command():
    tests = _bash_blocks()[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_ci_runs_the_readme_install_command_exactly_as_written():
    """.ci/run takes the first bash block out of the README and runs it: same text, not a copy."""
    import subprocess

    ci = (ROOT / ".ci" / "run").read_text()
    extract = next(line for line in ci.splitlines() if line.startswith("first_command=$("))
    got = subprocess.run(["bash", "-c", f"{extract}; printf %s \"$first_command\""], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    install = _bash_blocks()[0].strip()
    assert got == install and "torch==2.14.1 torchvision==0.29.1" in got
    assert 'bash -euo pipefail -c "$first_command"' in ci.splitlines()
    assert ci.index("bash -euo pipefail") < ci.index(_bash_blocks()[1].strip())


@pytest.mark.slow
def test_the_readme_vit_l_14_fp16_build_runs_as_written(tmp_path):
    """The user's own first command, `clipexport build ViT-L-14 --fp16 --pretrained none`, run as
    the README writes it (in a scratch directory: it writes engines/ there)."""
    import json
    import shlex
    import subprocess

    command = next(b.strip() for b in _bash_blocks() if b.strip().startswith("clipexport build ViT-L-14"))
    assert command == "clipexport build ViT-L-14 --fp16 --pretrained none"
    done = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "engines" / "ViT-L-14-none-fp16" / "manifest.json").read_text())
    assert manifest["precision"] == "fp16"
    for tower in manifest["towers"].values():
        assert tower["parity"]["passed"] and tower["parity"]["cosine_min"] > 0.999
    assert "summary:" in done.stderr


def test_readme_build_model_is_covered_by_the_real_model_tests():
    from test_real_models import CASES

    ci_models = [c.values[0] for c in CASES if not c.marks]
    assert "ViT-B-32" in ci_models
