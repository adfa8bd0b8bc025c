"""The on-disk contract: an artifact directory with its ONNX files and manifest.json.

    engines/ViT-B-32-none-fp32/
        image.onnx        text.onnx        manifest.json

A build writes into a hidden staging directory next to the target and renames it into
place only when every tower passed; a failed or interrupted build leaves nothing at the
target. Anything that runs an artifact first checks each file's sha256 against the manifest.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from clipexport.errors import ArtifactError, UsageError
from clipexport.hashing import file_sha256

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Past this size a protobuf cannot be serialized in one piece; weights go to an external file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 16: "bfloat16"}
VERSIONED_LIBRARIES = ("torch", "open_clip_torch", "onnx", "onnxscript", "onnxruntime", "onnxslim", "numpy")


def default_out_dir(model: str, weights_label: str, precision: str, root: Path = Path("engines")) -> Path:
    """engines/<MODEL>-<pretrained>-<precision>, with characters unsafe in file names replaced."""
    base = Path(model.split(":", 1)[1]).name if model.startswith("local-dir:") else model
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{base}-{weights_label}-{precision}")
    return root / name


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("clipexport", *VERSIONED_LIBRARIES):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing target unless --force; done before any work so nothing is written."""
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it or --out to choose another directory")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")


class StagingDir:
    """A hidden directory next to `target`; `commit()` renames it into place.

    Leaving the `with` block without commit (an error, Ctrl-C) deletes it, so a failed
    build leaves no half-written artifact.
    """

    def __init__(self, target: Path, force: bool) -> None:
        self.target = target
        self.force = force
        self.path: Path | None = None
        self._made_parent = False

    def __enter__(self) -> "StagingDir":
        parent = self.target.parent
        self._made_parent = not parent.exists()
        parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=parent))
        # mkdtemp makes it private (0700); the artifact gets the permissions of a normal mkdir.
        umask = os.umask(0)
        os.umask(umask)
        self.path.chmod(0o777 & ~umask)
        return self

    def commit(self) -> None:
        assert self.path is not None
        old = None
        if self.target.exists():
            check_out_dir(self.target, self.force)
            old = self.target.parent / f".{self.target.name}.replaced-{os.getpid()}"
            self.target.rename(old)
        self.path.rename(self.target)
        self.path = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
            if self._made_parent:
                try:
                    self.target.parent.rmdir()  # only if empty
                except OSError:
                    pass


def save_onnx(model: Any, path: Path) -> list[str]:
    """Write an ONNX model; weights go to `<name>.data` when the graph is near protobuf's 2 GB limit.

    Returns the file names written (relative to path's directory).
    """
    import onnx

    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return [path.name]
    data_name = f"{path.name}.data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
    return [path.name, data_name]


def tensor_infos(values: Any) -> list[dict[str, Any]]:
    """Names, dtypes and shapes (symbolic axes by name) of graph inputs or outputs."""
    out = []
    for value in values:
        t = value.type.tensor_type
        shape: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        out.append({"name": value.name, "dtype": ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape})
    return out


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise ArtifactError(f"{directory} is not a directory (expected an artifact written by `clipexport build`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{directory} has no {MANIFEST}: not an artifact written by `clipexport build`") from None
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    for key in ("format_version", "model", "precision", "towers", "files"):
        if key not in manifest:
            raise ArtifactError(f"{path} lacks the key {key!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {manifest['format_version']}; this clipexport reads {FORMAT_VERSION}. "
            "Rebuild the artifact."
        )
    return manifest


def check_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Check every file the manifest lists against its sha256; return the names checked.

    Raises ArtifactError naming every missing or changed file.
    """
    problems = []
    for name, expected in manifest["files"].items():
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(path) != expected:
            problems.append(f"{name} does not match its sha256 in {MANIFEST} (changed or truncated)")
    if problems:
        raise ArtifactError(f"{directory}: " + "; ".join(problems) + ". Rebuild it with `clipexport build`.")
    return list(manifest["files"])
