"""`pip install clipexport[runtime]` alone is enough: a fresh virtual environment without torch
loads a built artifact and gives the same embeddings as the development environment."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from twins import write_twin

from clipexport.runtime import load

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NETWORK_ERRORS = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
                  "ConnectTimeoutError", "Max retries exceeded")

SCRIPT = """
import sys
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch is importable in the runtime-only environment")
import numpy as np
from PIL import Image
import clipexport
rt = clipexport.load(sys.argv[1])
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 256, (50 + 7 * i, 40, 3), dtype=np.uint8)) for i in range(4)]
texts = ["a photo of a dog.", "東京の夜景 🍕", "tom &amp; jerry", ""]
np.savez(sys.argv[2], image=rt.encode_image(images), text=rt.encode_text(texts), ids=rt.tokenize(texts),
         pixels=rt.preprocess(images))
print(rt.backend, rt.device, "torch" in sys.modules)
"""


def test_runtime_extra_alone_embeds_without_torch(tmp_path: Path) -> None:
    from clipexport.build import BuildOptions, build

    artifact = build(BuildOptions(model=write_twin("vit", tmp_path / "twin"), pretrained="none",
                                  out=tmp_path / "artifact")).out_dir
    venv = tmp_path / "venv"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # The README's `pip install ".[runtime]"`, from the clone
    install = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                              ".[runtime]"], cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    if install.returncode != 0 and any(marker in install.stderr for marker in NETWORK_ERRORS):
        pytest.skip(f"PyPI is not reachable: {install.stderr.strip().splitlines()[-1]}")
    assert install.returncode == 0, install.stderr[-3000:]
    install_seconds = time.perf_counter() - started

    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    assert "torch" not in listed and "open_clip" not in listed and "open-clip" not in listed
    out = tmp_path / "venv-embeddings.npz"
    # Run from tmp_path so the repository checkout is not on sys.path: only the installed wheel counts.
    proc = subprocess.run([str(python), "-c", SCRIPT, str(artifact), str(out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["onnxruntime", "cpu", "False"]

    rt = load(artifact)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (50 + 7 * i, 40, 3), dtype=np.uint8)) for i in range(4)]
    texts = ["a photo of a dog.", "東京の夜景 🍕", "tom &amp; jerry", ""]
    theirs = np.load(out)
    assert np.array_equal(theirs["ids"], rt.tokenize(texts))
    assert np.abs(theirs["pixels"] - rt.preprocess(images)).max() <= 1e-6
    image_diff = float(np.abs(theirs["image"] - rt.encode_image(images)).max())
    text_diff = float(np.abs(theirs["text"] - rt.encode_text(texts)).max())
    assert image_diff <= 1e-5 and text_diff <= 1e-5
    print(f"\nruntime-only venv: created and installed in {install_seconds:.1f}s; "
          f"max abs diff vs dev env: image {image_diff:.2g}, text {text_diff:.2g}")
