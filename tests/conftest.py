from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Nothing here may reach a model hub: fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from twins import write_twin  # noqa: E402


@pytest.fixture
def twin(tmp_path_factory: pytest.TempPathFactory):
    """twin(recipe) -> a `local-dir:` model name of that recipe's tiny twin."""

    def make(recipe: str) -> str:
        return write_twin(recipe, tmp_path_factory.mktemp(f"twin-{recipe}"))

    return make


@pytest.fixture(scope="session")
def vit_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny-twin ViT artifact (image and text, fp32 ONNX) shared by the serving tests."""
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from clipexport.build import BuildOptions, build

    model = write_twin("vit", tmp_path_factory.mktemp("twin-serving"))
    out = tmp_path_factory.mktemp("artifact-serving") / "vit"
    return build(BuildOptions(model=model, pretrained="none", towers=["image", "text"], out=out)).out_dir
