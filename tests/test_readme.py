"""The README's first-screen commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

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
    assert "torch==2.14.1 torchvision==0.29.1" in ci


def test_readme_build_model_is_covered_by_the_real_model_tests():
    from test_real_models import CASES

    ci_models = [c.values[0] for c in CASES if not c.marks]
    assert "ViT-B-32" in ci_models
