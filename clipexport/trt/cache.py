"""Engine cache keys: which graph, TensorRT, GPU, profile and precision an engine was built for.

A TensorRT plan is only valid for the exact TensorRT version and GPU model it was built
with; deserializing it elsewhere fails (or, across versions, may crash). So an engine is
stored under a name derived from an explicit content key, the key goes into the manifest,
and before any engine is deserialized the stored key is compared with the current one:
a mismatch means rebuild, or a clear error with --no-rebuild - never a deserialization.

    image.onnx  ──sha256──┐
    TensorRT 10.14.1      ├─► EngineKey ─► digest ─► image.3f9c2a1b7d0e4c55.plan
    NVIDIA H100, sm 9.0   │
    profile, precision ───┘
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipexport.errors import EngineError
from clipexport.hashing import file_sha256
from clipexport.trt.profiles import InputProfile

KEY_VERSION = 1
DIGEST_CHARS = 16


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    profiles: tuple[InputProfile, ...]
    precision: str
    # Settings that change the engine's kernels; a change forces a rebuild (like Torch-TensorRT's
    # engine cache). The memory limit and optimization level change tactic choice, the
    # attention mode changes which layers exist.
    settings: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "key_version": KEY_VERSION,
            "onnx_sha256": self.onnx_sha256,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "profiles": [p.to_json() for p in self.profiles],
            "precision": self.precision,
            # sorted so the digest does not depend on the order options were given in
            "settings": dict(sorted(self.settings)),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineKey:
        if data.get("key_version") != KEY_VERSION:
            raise EngineError(f"engine key version {data.get('key_version')!r} is not {KEY_VERSION}")
        try:
            return cls(
                onnx_sha256=str(data["onnx_sha256"]),
                tensorrt_version=str(data["tensorrt_version"]),
                gpu_name=str(data["gpu_name"]),
                compute_capability=str(data["compute_capability"]),
                profiles=tuple(InputProfile.from_json(p) for p in data["profiles"]),
                precision=str(data["precision"]),
                settings=tuple(sorted((str(k), str(v)) for k, v in dict(data.get("settings", {})).items())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"malformed engine key in the manifest: {exc!r}") from None

    def digest(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def file_name(self, tower: str) -> str:
        return f"{tower}.{self.digest()[:DIGEST_CHARS]}.plan"


def make_key(
    onnx_path: Path,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    profiles: Sequence[InputProfile],
    precision: str,
    settings: dict[str, object] | None = None,
    onnx_sha256: str | None = None,
) -> EngineKey:
    """The key of the engine that building `onnx_path` here, now, would produce."""
    return EngineKey(
        onnx_sha256=onnx_sha256 or file_sha256(onnx_path),
        tensorrt_version=tensorrt_version,
        gpu_name=gpu_name,
        compute_capability=f"{compute_capability[0]}.{compute_capability[1]}",
        profiles=tuple(profiles),
        precision=precision,
        settings=tuple(sorted((k, str(v)) for k, v in (settings or {}).items())),
    )


def key_differences(stored: EngineKey, current: EngineKey) -> list[str]:
    """Human-readable reasons the stored engine does not fit; empty when it does."""
    out = []
    a, b = stored.to_json(), current.to_json()
    labels = {
        "onnx_sha256": "the ONNX graph changed",
        "tensorrt_version": "TensorRT version",
        "gpu_name": "GPU",
        "compute_capability": "GPU compute capability",
        "profiles": "optimization profile",
        "precision": "precision",
        "settings": "builder settings",
    }
    for name, label in labels.items():
        if a[name] != b[name]:
            if name in ("onnx_sha256", "profiles"):
                out.append(label)
            else:
                out.append(f"{label}: engine has {a[name]!r}, this build needs {b[name]!r}")
    return out


@dataclass(frozen=True)
class CacheDecision:
    """`reuse` the stored engine file, or `build` a new one (with the reasons)."""

    action: str  # "reuse" or "build"
    reasons: tuple[str, ...]
    path: Path | None = None  # the reusable engine file


def decide(
    directory: Path | None,
    stored_entry: dict[str, Any] | None,
    current: EngineKey,
    no_rebuild: bool,
    tower: str,
) -> CacheDecision:
    """Compare a tower's engine entry from a manifest with the key this build needs.

    The decision is made from the manifest and the file's sha256 only; nothing is
    deserialized. With no_rebuild, anything other than a fitting engine is an EngineError.
    """
    reasons: list[str]
    path: Path | None = None
    if directory is None or not stored_entry:
        reasons = ["no engine was built before"]
    else:
        try:
            stored = EngineKey.from_json(stored_entry["key"])
        except (EngineError, KeyError) as exc:
            stored, reasons = None, [f"the manifest's engine entry is unreadable ({exc})"]
        if stored is not None:
            reasons = key_differences(stored, current)
            path = directory / str(stored_entry.get("file", ""))
            if not reasons:
                if not path.is_file():
                    reasons = [f"{path.name} is missing"]
                elif file_sha256(path) != stored_entry.get("sha256"):
                    reasons = [f"{path.name} does not match its sha256 in the manifest"]
    if not reasons:
        return CacheDecision("reuse", (), path)
    if no_rebuild:
        raise EngineError(
            f"the stored {tower} engine cannot be used: " + "; ".join(reasons)
            + ". Run again without --no-rebuild to build a new engine for this machine."
        )
    return CacheDecision("build", tuple(reasons))
