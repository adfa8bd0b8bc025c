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
from typing import Any, Callable

from clipexport.errors import UsageError
from clipexport.manifest import FORMAT_VERSION, MANIFEST, tensor_infos

__all__ = ["FORMAT_VERSION", "MANIFEST", "StagingDir", "check_out_dir", "check_writable", "is_artifact", "default_out_dir", "library_versions",
           "save_onnx", "tensor_infos", "write_manifest"]

# Past this size a protobuf cannot be serialized in one piece; weights go to an external file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
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


def is_artifact(path: Path) -> bool:
    """Whether `path` holds an artifact of ours: a manifest.json that parses to one."""
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data


def _is_replaceable(out: Path, is_ours: Callable[[Path], bool]) -> bool:
    """An empty directory, or an earlier output of ours."""
    try:
        entries = list(out.iterdir())
    except OSError:
        return False
    return not entries or is_ours(out)


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out: Path, option: str = "--out") -> None:
    """Refuse an output that cannot be written (read-only file system, no permission, a file in the
    way) before any work, instead of an OSError after minutes of it."""
    base = _nearest_existing(out.parent if out.name else out)
    if not base.is_dir():
        raise UsageError(f"{option} {out}: {base} is a file, not a directory")
    try:
        read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only or not os.access(base, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        raise UsageError(f"{option} {out}: {base} {why}; choose another directory")


def check_out_dir(out: Path, force: bool, is_ours: Callable[[Path], bool] = is_artifact,
                  option: str = "--out") -> None:
    """Refuse a target that cannot or must not be replaced, before any work, so nothing is written.

    An existing target is replaced only with --force, and only when it is empty or an earlier
    output of ours (`is_ours`): --force never deletes a user's other files.
    """
    here = Path.cwd().resolve()
    target = Path(os.path.abspath(out)).resolve()
    if target == here or target in here.parents:
        raise UsageError(f"{option} {out}: that is the current directory (or holds it), which a finished build "
                         "would replace; name a new directory, e.g. engines/NAME")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UsageError(f"{out} exists and is not a directory")
        if not force:
            raise UsageError(f"{out} already exists; pass --force to replace it or {option} to choose another "
                             "directory")
        if not _is_replaceable(out, is_ours):
            raise UsageError(f"{option} {out}: --force replaces only an earlier output of clipexport or an empty "
                             f"directory, and {out} holds other files; choose another directory")
    check_writable(out, option)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_staging(target: Path) -> list[Path]:
    """Delete the staging and replaced directories of `target` left by builds that died (SIGKILL,
    power loss): their names carry the builder's pid, and that process is gone. Returns them."""
    parent = target.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(partial|replaced)-(?:(\d+)(?:-|$))?")
    removed = []
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match.group(2)) if match.group(2) else None
        # No pid: written by an older clipexport, whose staging names did not carry one.
        if pid is None or (pid != os.getpid() and not _pid_alive(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class StagingDir:
    """A hidden directory next to `target`; `commit()` renames it into place.

    Leaving the `with` block without commit (an error, Ctrl-C) deletes it, so a failed
    build leaves no half-written artifact. A process killed outright (SIGKILL) cannot clean
    up: the next build of the same target removes what it left (remove_stale_staging).
    """

    def __init__(self, target: Path, force: bool, is_ours: Callable[[Path], bool] = is_artifact) -> None:
        self.target = target
        self.force = force
        self.is_ours = is_ours
        self.path: Path | None = None
        self._made_parent = False

    def __enter__(self) -> "StagingDir":
        parent = self.target.parent
        self._made_parent = not parent.exists()
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.target)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-{os.getpid()}-", dir=parent))
        # mkdtemp makes it private (0700); the artifact gets the permissions of a normal mkdir.
        umask = os.umask(0)
        os.umask(umask)
        self.path.chmod(0o777 & ~umask)
        return self

    def commit(self) -> None:
        assert self.path is not None
        old = None
        if self.target.exists():
            check_out_dir(self.target, self.force, self.is_ours)
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


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
