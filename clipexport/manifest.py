"""The manifest as types, and the one reader every command uses.

    open_artifact(dir)  ->  Manifest            (validated, every listed file's sha256 checked)

Everything that opens an artifact (load, verify, info, bench, triton, embed-dataset) goes
through `open_artifact`. A manifest is untrusted input: `Manifest.from_json` checks every
type and range it relies on, and every file name it holds is confined to the artifact
directory (relative, no `..`, no link out of it) and must be listed in `files` with a
sha256. A problem is an ArtifactError of one line naming the key.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from clipexport.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TOWER_NAMES = ("image", "text")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
#: The largest batch a build verifies (parity runs at the range's max) and a manifest may declare.
MAX_BATCH = 1024
#: The shortest token sequence a trimmed text graph takes (SOT + EOT).
MIN_SEQUENCE = 2
ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 16: "bfloat16"}
TENSOR_DTYPES = tuple(ONNX_DTYPES.values())
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _fail(where: str, problem: str) -> ArtifactError:
    return ArtifactError(f"{MANIFEST}: {where} {problem}; rebuild the artifact with `clipexport build`")


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str,
         optional: bool = False) -> Any:
    """data[key] checked against `kind` (bool is never an int here)."""
    if key not in data or (optional and data[key] is None):
        if optional:
            return None
        raise _fail(f"{where}.{key}".lstrip("."), "is missing")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise _fail(f"{where}.{key}".lstrip("."), f"is {type(value).__name__} {_short(value)}, expected {names}")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(data: Mapping[str, Any], key: str, where: str, low: int, high: int) -> int:
    value: int = _get(data, key, int, where)
    if not low <= value <= high:
        raise _fail(f"{where}.{key}", f"is {value}, outside {low}..{high}")
    return value


def _number(data: Mapping[str, Any], key: str) -> float | None:
    value = _get(data, key, (int, float), "", optional=True)
    if value is not None and not math.isfinite(value):
        raise _fail(key, f"is {value}, expected a finite number")
    return None if value is None else float(value)


def confined_name(name: Any, where: str) -> str:
    """A file name inside the artifact: relative, forward slashes, no `..`, no empty parts."""
    if not isinstance(name, str) or not name:
        raise _fail(where, f"is {_short(name)}, expected a file name inside the artifact")
    parts = PurePosixPath(name).parts
    if (name.startswith(("/", "\\")) or "\\" in name or "\x00" in name or re.match(r"^[A-Za-z]:", name)
            or any(p in ("..", ".") for p in parts) or name.endswith("/")):
        raise _fail(where, f"names {name!r}, outside the artifact directory (only names inside it are read)")
    return name


def tensor_infos(values: Any) -> list[dict[str, Any]]:
    """Names, dtypes and shapes (symbolic axes by name) of ONNX graph inputs or outputs, as JSON."""
    out = []
    for value in values:
        t = value.type.tensor_type
        shape: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        out.append({"name": value.name, "dtype": ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape})
    return out


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # symbolic axes by name

    @classmethod
    def from_json(cls, data: Any, where: str) -> TensorInfo:
        if not isinstance(data, dict):
            raise _fail(where, f"is {_short(data)}, expected an object with name, dtype and shape")
        name = _get(data, "name", str, where)
        dtype = _get(data, "dtype", str, where)
        if dtype not in TENSOR_DTYPES:
            raise _fail(f"{where}.dtype", f"is {dtype!r}, expected one of {', '.join(TENSOR_DTYPES)}")
        shape = _get(data, "shape", list, where)
        for axis in shape:
            if isinstance(axis, bool) or not (isinstance(axis, str) and axis or isinstance(axis, int) and axis > 0):
                raise _fail(f"{where}.shape", f"holds {_short(axis)}, expected positive sizes or axis names")
        return cls(name, dtype, tuple(shape))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def describe(self) -> str:
        return f"{self.name} {self.dtype}[{', '.join(str(s) for s in self.shape)}]"


@dataclass(frozen=True)
class Batch:
    min: int
    opt: int
    max: int

    @classmethod
    def from_json(cls, data: Any) -> Batch:
        if not isinstance(data, dict):
            raise _fail("batch", f"is {_short(data)}, expected {{min, opt, max}}")
        lo = _int(data, "min", "batch", 1, MAX_BATCH)
        opt = _int(data, "opt", "batch", 1, MAX_BATCH)
        hi = _int(data, "max", "batch", 1, MAX_BATCH)
        if not lo <= opt <= hi:
            raise _fail("batch", f"is {lo}:{opt}:{hi}, expected min <= opt <= max")
        return cls(lo, opt, hi)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class SequenceInfo:
    """How the runtime may cut token ids (text tower): a dynamic axis, or a fixed length."""

    dynamic: bool
    max: int
    pad_id: int

    @classmethod
    def from_json(cls, data: Any, where: str, context_length: int) -> SequenceInfo:
        if data is None:
            return cls(False, context_length, 0)
        if not isinstance(data, dict):
            raise _fail(where, f"is {_short(data)}, expected an object")
        axis = _get(data, "axis", str, where, optional=True)
        if axis not in (None, "sequence"):
            raise _fail(f"{where}.axis", f"is {axis!r}, expected 'sequence' or null")
        pad_id = _int(data, "pad_id", where, 0, 2**31 - 1) if "pad_id" in data else 0
        if axis is None:
            return cls(False, context_length, pad_id)
        high = _int(data, "max", where, MIN_SEQUENCE, 65536)
        return cls(True, high, pad_id)


@dataclass(frozen=True)
class EngineEntry:
    file: str
    key: Mapping[str, Any]

    @classmethod
    def from_json(cls, data: Any, where: str) -> EngineEntry | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise _fail(where, f"is {_short(data)}, expected an object")
        return cls(confined_name(_get(data, "file", str, where), f"{where}.file"), _get(data, "key", dict, where))


def _check_tensorrt(data: Any, where: str) -> None:
    """The TensorRT-compatibility verdict (clipexport.trt.compat) is displayed: check what is shown."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise _fail(where, f"is {_short(data)}, expected an object")
    for key in ("min_release", "min_release_with_plugin", "polygraphy"):
        _get(data, key, str, where, optional=True)
    for i, blocker in enumerate(_get(data, "blockers", list, where, optional=True) or []):
        at = f"{where}.blockers[{i}]"
        if not isinstance(blocker, dict):
            raise _fail(at, f"is {_short(blocker)}, expected an object")
        _get(blocker, "op", str, at)
        _get(blocker, "count", int, at)
        _get(blocker, "parses_from", str, at, optional=True)
        if "parses_from" not in blocker:
            raise _fail(f"{at}.parses_from", "is missing")


@dataclass(frozen=True)
class TowerEntry:
    name: str
    onnx: str
    files: tuple[str, ...]  # the graph and its external data
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    parity: Mapping[str, Any]
    sequence: SequenceInfo | None  # text tower only
    engine: EngineEntry | None
    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, tower: str, data: Any, context_length: int) -> TowerEntry:
        where = f"towers.{tower}"
        if not isinstance(data, dict):
            raise _fail(where, f"is {_short(data)}, expected an object")
        onnx = confined_name(_get(data, "onnx", str, where), f"{where}.onnx")
        files = _get(data, "files", list, where) if "files" in data else [onnx]
        files = [confined_name(n, f"{where}.files") for n in files]
        if onnx not in files:
            files.insert(0, onnx)
        inputs = _get(data, "inputs", list, where)
        outputs = _get(data, "outputs", list, where)
        if len(inputs) != 1 or not outputs:
            raise _fail(where, f"has {len(inputs)} inputs and {len(outputs)} outputs, expected 1 and at least 1")
        parity = _get(data, "parity", dict, where)
        sequence = None
        if tower == "text":
            sequence = SequenceInfo.from_json(data.get("sequence"), f"{where}.sequence", context_length)
        entry = cls(tower, onnx, tuple(files),
                    tuple(TensorInfo.from_json(v, f"{where}.inputs") for v in inputs),
                    tuple(TensorInfo.from_json(v, f"{where}.outputs") for v in outputs),
                    parity, sequence, EngineEntry.from_json(data.get("engine"), f"{where}.engine"), data)
        entry._check_shapes()
        _check_tensorrt(data.get("tensorrt"), f"{where}.tensorrt")
        return entry

    def _check_shapes(self) -> None:
        where = f"towers.{self.name}.inputs"
        (inp,) = self.inputs
        expected = ("float32", "float16", "bfloat16") if self.name == "image" else ("int64", "int32")
        rank = 4 if self.name == "image" else 2
        if inp.dtype not in expected or len(inp.shape) != rank:
            raise _fail(where, f"is {inp.describe()}, not the input of an {self.name} tower")

    @property
    def input(self) -> TensorInfo:
        return self.inputs[0]

    @property
    def embed_dim(self) -> int | None:
        dim = self.outputs[0].shape[-1] if self.outputs[0].shape else None
        return dim if isinstance(dim, int) else None

    def listed_files(self) -> list[str]:
        return [*self.files, *([self.engine.file] if self.engine else [])]


@dataclass(frozen=True)
class Weights:
    kind: str  # "random" | "tag" | "file" | ...
    value: str
    seed: int
    sha256: str | None

    @classmethod
    def from_json(cls, data: Any) -> Weights:
        if not isinstance(data, dict):
            raise _fail("weights", f"is {_short(data)}, expected an object")
        return cls(_get(data, "kind", str, "weights"), _get(data, "value", str, "weights"),
                   _get(data, "seed", int, "weights") if "seed" in data else 0,
                   _get(data, "sha256", str, "weights", optional=True))

    def describe(self) -> str:
        if self.kind == "random":
            return f"random (seed {self.seed})"
        return f"{self.kind} {self.value}"


@dataclass(frozen=True)
class Manifest(Mapping[str, Any]):
    """A validated manifest. Typed fields for what commands rely on; `data` keeps the whole
    JSON (read-only Mapping access, for sections only shown, such as versions and notes)."""

    format_version: int
    model: str
    precision: str
    batch: Batch
    towers: Mapping[str, TowerEntry]
    files: Mapping[str, str]  # name -> sha256
    weights: Weights
    tokenizer: Mapping[str, Any] | None
    preprocess: Mapping[str, Any] | None
    logit_scale: float | None  # exp'd: zero-shot logits = logit_scale * cos + logit_bias
    logit_bias: float | None
    data: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise _fail("the top level", f"is {type(data).__name__}, expected an object")
        version = _get(data, "format_version", int, "")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{MANIFEST} has format_version {version}; this clipexport reads {FORMAT_VERSION}. "
                                "Rebuild the artifact.")
        model = _get(data, "model", str, "")
        precision = _get(data, "precision", str, "")
        if precision not in PRECISIONS:
            raise _fail("precision", f"is {precision!r}, expected one of {', '.join(PRECISIONS)}")
        files = _get(data, "files", dict, "")
        for name, digest in files.items():
            confined_name(name, "files")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise _fail(f"files[{name!r}]", f"is {_short(digest)}, expected a sha256 (64 hex digits)")
        tokenizer = _get(data, "tokenizer", dict, "", optional=True)
        context_length = 77
        if tokenizer is not None and "context_length" in tokenizer:
            context_length = _int(tokenizer, "context_length", "tokenizer", MIN_SEQUENCE, 65536)
        towers_json = _get(data, "towers", dict, "")
        if not towers_json or set(towers_json) - set(TOWER_NAMES):
            raise _fail("towers", f"holds {sorted(towers_json)!r}, expected image and/or text")
        towers = {t: TowerEntry.from_json(t, towers_json[t], context_length) for t in TOWER_NAMES if t in towers_json}
        manifest = cls(version, model, precision, Batch.from_json(data.get("batch")), towers, dict(files),
                       Weights.from_json(data.get("weights")), tokenizer,
                       _get(data, "preprocess", dict, "", optional=True),
                       _number(data, "logit_scale"), _number(data, "logit_bias"), data)
        manifest._check_sections()
        for name in manifest.referenced_files():
            if name not in files:
                raise _fail("files", f"lacks {name!r}, which the manifest uses: every file read needs a sha256")
        return manifest

    def _check_sections(self) -> None:
        if "image" in self.towers and self.preprocess is None:
            raise _fail("preprocess", "is missing, and the image tower needs it")
        if "text" in self.towers and self.tokenizer is None:
            raise _fail("tokenizer", "is missing, and the text tower needs it")
        if self.tokenizer is not None:
            kind = self.tokenizer.get("kind")
            if kind == "clip-bpe":
                confined_name(_get(self.tokenizer, "vocab", str, "tokenizer"), "tokenizer.vocab")
            elif kind == "hf":
                confined_name(_get(self.tokenizer, "directory", str, "tokenizer"), "tokenizer.directory")

    def referenced_files(self) -> list[str]:
        """Every file a command may open: graphs, their data, engines, tokenizer files."""
        names = [n for t in self.towers.values() for n in t.listed_files()]
        if self.tokenizer is not None and "text" in self.towers:
            if self.tokenizer.get("kind") == "clip-bpe":
                names.append(self.tokenizer["vocab"])
            elif self.tokenizer.get("kind") == "hf":
                names.append(f"{self.tokenizer['directory'].rstrip('/')}/tokenizer.json")
                extra = self.tokenizer.get("files") or []
                if not isinstance(extra, list):
                    raise _fail("tokenizer.files", f"is {_short(extra)}, expected a list of file names")
                names += [confined_name(n, "tokenizer.files") for n in extra]
        return names

    def to_json(self) -> dict[str, Any]:
        return dict(self.data)

    # read-only Mapping over the JSON, for sections that are only displayed
    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __hash__(self) -> int:
        return id(self)


def read_manifest(directory: Path) -> Manifest:
    """manifest.json of `directory`, parsed, validated, and its file names confined to the artifact
    (links out of it refused); the files are not hashed here: see open_artifact."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory (expected an artifact written by `clipexport build`)")
    path = directory / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{directory} has no {MANIFEST}: not an artifact written by `clipexport build`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    try:
        manifest = Manifest.from_json(data)
    except ArtifactError as exc:
        raise ArtifactError(f"{directory}: {exc}") from None
    for name in manifest.files:  # a link out of the artifact is refused by every reader, hashed or not
        artifact_path(directory, manifest, name)
    return manifest


def artifact_path(directory: Path, manifest: Manifest, name: str) -> Path:
    """The path of a listed file, refused if it is not listed or leads out of the artifact (a link)."""
    if name not in manifest.files:
        raise ArtifactError(f"{directory}: {name!r} is not listed in {MANIFEST} with a sha256")
    root = Path(directory).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ArtifactError(f"{directory}: {name} leads outside the artifact (to {path})")
    return Path(directory) / name


def check_files(directory: Path, manifest: Manifest) -> list[str]:
    """Every listed file against its sha256; ArtifactError naming each missing, changed or escaping one."""
    from clipexport.hashing import file_sha256

    problems = []
    for name, expected in manifest.files.items():
        path = artifact_path(directory, manifest, name)
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(path) != expected:
            problems.append(f"{name} does not match its sha256 in {MANIFEST} (changed or truncated)")
    if problems:
        raise ArtifactError(f"{directory}: " + "; ".join(problems) + ". Rebuild it with `clipexport build`.")
    return list(manifest.files)


def check_graphs(directory: Path, manifest: Manifest) -> None:
    """Each tower's graph takes and gives what the manifest says (an image tower pointed at the
    text graph is refused here, not on first call). Needs `onnx`; without it the backends check."""
    try:
        import onnx
    except ImportError:
        return
    for tower, entry in manifest.towers.items():
        path = artifact_path(directory, manifest, entry.onnx)
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as exc:  # noqa: BLE001 - a protobuf decode error names no type we could list
            raise ArtifactError(f"{directory}: {entry.onnx} is not a readable ONNX graph ({exc})") from None
        actual_in = [TensorInfo.from_json(v, entry.onnx) for v in tensor_infos(graph.input)]
        actual_out = [TensorInfo.from_json(v, entry.onnx) for v in tensor_infos(graph.output)]
        check_tower_io(directory, entry, actual_in, actual_out)


def check_tower_io(directory: Path, entry: TowerEntry, inputs: list[TensorInfo],
                   outputs: list[TensorInfo]) -> None:
    """The graph's inputs/outputs (names, dtypes, shapes) equal the manifest's for this tower."""
    if list(entry.inputs) != inputs or list(entry.outputs) != outputs:
        got = ", ".join(i.describe() for i in inputs)
        raise ArtifactError(f"{directory}: the {entry.name} tower's graph {entry.onnx} takes {got}, but the "
                            f"manifest says {entry.input.describe()}: not this tower's graph; rebuild the artifact")


def open_artifact(directory: Path | str, *, files: bool = True, graphs: bool = True) -> Manifest:
    """The one reader: manifest validated, every file's sha256 checked, graphs' inputs matched."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if files:
        check_files(directory, manifest)
    if graphs:
        check_graphs(directory, manifest)
    return manifest


__all__ = [
    "Batch", "EngineEntry", "FORMAT_VERSION", "MANIFEST", "MAX_BATCH", "MIN_SEQUENCE", "Manifest", "TensorInfo",
    "TowerEntry", "Weights", "artifact_path", "check_files", "check_graphs", "check_tower_io", "open_artifact",
    "read_manifest",
]
