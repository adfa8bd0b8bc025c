"""An artifact -> a Triton Inference Server model repository, written atomically.

Per tower (prefix "clip"), three models:

    clip_image_preprocess  (python)   image bytes ──► pixel_values ─┐
    clip_image_encoder     (onnxruntime_onnx | tensorrt_plan)   ◄──┘ ──► image_embeds
    clip_image             (ensemble) "image" TYPE_STRING [1] ──► "embedding" [D]

    REPO/
      clip_image/config.pbtxt             clip_image/1/                 (ensembles need the empty version dir)
      clip_image_preprocess/config.pbtxt  clip_image_preprocess/1/{model.py, clipexport.json}
      clip_image_encoder/config.pbtxt     clip_image_encoder/1/model.onnx (or model.plan)
      clip_text_tokenize/...              clip_text_tokenize/1/{model.py, clipexport.json, tokenizer/...}

The artifact's files are checked against manifest.json first; the repository is written in a
staging directory next to --out and renamed into place at the end, so a failure leaves nothing.
Embeddings leave the ensemble as the tower computes them (not unit length): normalize in the client.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from clipexport import __version__
from clipexport.artifacts import StagingDir, check_out_dir
from clipexport.manifest import check_files, check_graphs, read_manifest
from clipexport.errors import ArtifactError, UsageError
from clipexport.triton.config import (
    PLATFORM_ONNX,
    PLATFORM_PLAN,
    Batching,
    Instances,
    Step,
    TensorSpec,
    ensemble_config,
    model_config_pb2,
    python_config,
    to_pbtxt,
    tower_config,
)

TOWERS = ("image", "text")
BACKENDS = ("auto", "onnxruntime", "tensorrt")
#: What runs a tower: Triton's own backend for the platform (onnxruntime / tensorrt), or ONNX
#: Runtime inside the Python backend (python_encoder.py), for servers that lack the former.
ENCODERS = ("native", "python")
#: TowerModels.platform of an --encoder python tower.
PLATFORM_PYTHON = "python"
#: The ensemble's tensors: what a client sends and gets back.
RAW_INPUTS = {"image": "image", "text": "text"}
EMBEDDING = "embedding"
VERSION = "1"
PYTHON_MODEL_FILE = Path(__file__).with_name("python_model.py")
PYTHON_ENCODER_FILE = Path(__file__).with_name("python_encoder.py")
PYTHON_CONFIG_FILE = "clipexport.json"
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True)
class TritonOptions:
    """What `clipexport triton` writes. towers None: every tower the artifact has."""

    out: Path
    towers: tuple[str, ...] | None = None
    backend: str = "auto"  # auto: the TensorRT plan where the artifact has one and --kind is gpu
    instances: int = 1
    kind: str = "gpu"
    max_queue_delay_us: int = 100
    prefix: str = "clip"
    force: bool = False
    encoder: str = "native"  # "python": ONNX Runtime inside Triton's Python backend (ENCODERS)


@dataclass(frozen=True)
class TowerModels:
    """The models written for one tower. preprocess/ensemble are None when the artifact has no tokenizer."""

    tower: str
    encoder: str
    platform: str
    preprocess: str | None
    ensemble: str | None
    inputs: tuple[TensorSpec, ...]  # the encoder's
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class RepositoryResult:
    out: Path
    towers: tuple[TowerModels, ...]
    notes: tuple[str, ...] = ()


@dataclass
class _TowerPlan:
    """Everything decided (and checked) about one tower before anything is written."""

    models: TowerModels
    model_file: str  # the artifact file that becomes model.onnx / model.plan
    extra_files: list[str]  # e.g. external ONNX weights, copied under their own names
    raw: TensorSpec | None  # the Python model's input
    converted: TensorSpec | None  # the Python model's output == the encoder's input
    python_cfg: dict[str, Any] | None
    assets: list[str] = field(default_factory=list)  # tokenizer files, relative to the artifact
    header: list[str] = field(default_factory=list)  # comment lines atop each config.pbtxt
    notes: list[str] = field(default_factory=list)  # what a user must know to serve it (also in the header)


def write_repository(directory: Path, options: TritonOptions) -> RepositoryResult:
    """Write a Triton model repository for the artifact in `directory` to `options.out`.

    Raises UsageError for bad options (a tower the artifact lacks, an existing --out without
    force) and ArtifactError for an artifact that does not match its manifest, before writing.
    """
    directory = Path(directory)
    out = Path(options.out)
    if options.backend not in BACKENDS:
        raise UsageError(f"--backend {options.backend!r}: expected one of {', '.join(BACKENDS)}")
    if options.encoder not in ENCODERS:
        raise UsageError(f"--encoder {options.encoder!r}: expected one of {', '.join(ENCODERS)}")
    if options.encoder == "python" and options.backend == "tensorrt":
        raise UsageError("--encoder python runs the ONNX graph with ONNX Runtime: use --backend onnxruntime or auto")
    if not _PREFIX.match(options.prefix):
        raise UsageError(f"--prefix {options.prefix!r}: use letters, digits, '_', '.', '-' (Triton model names)")
    instances = Instances(options.instances, options.kind)
    manifest = read_manifest(directory)
    towers = _select_towers(directory, manifest, options.towers)
    check_out_dir(out, options.force, is_repository)
    _refuse_overlap(directory, out)
    model_config_pb2()  # tritonclient missing: say so before hashing gigabytes
    check_files(directory, manifest)
    check_graphs(directory, manifest)  # an encoder pointed at the other tower's graph is refused here

    batching = Batching.from_manifest(manifest.get("batch"), options.max_queue_delay_us)
    plans = [_plan_tower(directory, manifest, tower, options) for tower in towers]
    notes = [note for plan in plans for note in plan.notes]

    with StagingDir(out, options.force, is_repository) as staging:
        assert staging.path is not None
        for plan in plans:
            _write_tower(directory, staging.path, plan, batching, instances)
        staging.commit()
    return RepositoryResult(out, tuple(p.models for p in plans), tuple(notes))


def is_repository(path: Path) -> bool:
    """Whether `path` is a model repository written by `clipexport triton` (--force may replace it)."""
    for config in path.glob("*/config.pbtxt"):
        try:
            with open(config, encoding="utf-8", errors="replace") as fh:
                if "written by clipexport" in fh.read(400):
                    return True
        except OSError:
            continue
    return False


def _select_towers(directory: Path, manifest: Mapping[str, Any], wanted: tuple[str, ...] | None) -> list[str]:
    present = [t for t in TOWERS if t in (manifest.get("towers") or {})]
    if not present:
        raise ArtifactError(f"{directory}: the manifest lists no image or text tower")
    if wanted is None:
        return present
    if not wanted:
        raise UsageError("--towers: name at least one tower (image, text)")
    for tower in wanted:
        if tower not in TOWERS:
            raise UsageError(f"--towers {tower!r}: expected image and/or text")
        if tower not in present:
            raise UsageError(f"{directory} has no {tower} tower (it has: {', '.join(present)}); "
                             f"rebuild it with `clipexport build --towers {','.join(TOWERS)}` or drop {tower!r}")
    return [t for t in TOWERS if t in wanted]


def _refuse_overlap(directory: Path, out: Path) -> None:
    # --force would rename the old --out away and delete it: never when that holds the artifact.
    src, dst = directory.resolve(), out.resolve()
    if src == dst or dst in src.parents or src in dst.parents:
        raise UsageError(f"--out {out}: must be outside the artifact {directory} (and not contain it)")


def _relative(name: str, where: str) -> str:
    """A manifest path, checked to stay inside the artifact (it is copied into the repository)."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts:
        raise ArtifactError(f"manifest {where}: {name!r} is not a path inside the artifact")
    return str(path)


def _plan_tower(directory: Path, manifest: Mapping[str, Any], tower: str, options: TritonOptions) -> _TowerPlan:
    info = manifest["towers"][tower]
    where = f"towers.{tower}"
    try:
        raw_inputs, raw_outputs = list(info["inputs"]), list(info["outputs"])
    except (KeyError, TypeError):
        raise ArtifactError(f"manifest {where}: lacks inputs/outputs") from None
    if len(raw_inputs) != 1 or not raw_outputs:
        raise ArtifactError(f"manifest {where}: expected one input and at least one output, got "
                            f"{len(raw_inputs)} and {len(raw_outputs)}")
    inputs = tuple(TensorSpec.from_manifest(e, f"{where}.inputs") for e in raw_inputs)
    outputs = tuple(TensorSpec.from_manifest(e, f"{where}.outputs") for e in raw_outputs)
    listed = set(manifest["files"])

    engine = info.get("engine") or None
    use_plan = _use_plan(tower, engine, options) and options.encoder != "python"
    header = [f"written by clipexport {__version__} `clipexport triton` from {directory}",
              f"model {manifest['model']}, precision {manifest['precision']}, {tower} tower"]
    notes: list[str] = []
    if use_plan:
        assert engine is not None
        platform, model_file, extra = PLATFORM_PLAN, _relative(str(engine.get("file", "")), f"{where}.engine.file"), []
        if int((manifest.get("batch") or {}).get("min", 1)) > 1:
            raise UsageError(f"the {tower} TensorRT plan was built for batches of at least "
                             f"{manifest['batch']['min']}, but Triton sends any batch from 1: use --backend "
                             "onnxruntime, or rebuild with --batch 1:OPT:MAX")
        key = engine.get("key") or {}
        version = engine.get("tensorrt_version") or key.get("tensorrt_version")
        notes.append(f"the {tower} plan runs only on TensorRT {version} and a {key.get('gpu_name', 'GPU')} "
                     f"(sm {key.get('compute_capability', '?')}): use a Triton release with that TensorRT")
        if engine.get("attention_mode") == "plugin":
            notes.append(f"the {tower} plan uses clipexport's attention plugin (clipexport::clip_attention): "
                         "Triton's TensorRT backend must have it registered, or use --backend onnxruntime")
    else:
        platform = PLATFORM_ONNX
        model_file = _relative(str(info.get("onnx", "")), f"{where}.onnx")
        extra = [_relative(f, f"{where}.files") for f in info.get("files") or [] if f != model_file]
        if PurePosixPath(model_file).parent != PurePosixPath("."):
            # External weights are found by a path relative to the .onnx file; keep them side by side.
            raise ArtifactError(f"manifest {where}.onnx {model_file!r}: expected a file at the artifact's top level")
    if options.encoder == "python":
        platform = PLATFORM_PYTHON
    for name in [model_file, *extra]:
        if name not in listed:
            raise ArtifactError(f"manifest {where}: {name} is not in the manifest's files (no sha256 to check)")

    prefix = options.prefix
    encoder = f"{prefix}_{tower}_encoder"
    plan = _TowerPlan(
        models=TowerModels(tower, encoder, platform, None, None, inputs, outputs),
        model_file=model_file, extra_files=extra, raw=None, converted=None, python_cfg=None,
        header=header, notes=notes,
    )
    graph_input = inputs[0]
    if graph_input.dtype not in ("float32", "float16", "int64", "int32"):
        # model.py hands numpy arrays to Triton, and numpy has no bfloat16.
        raise ArtifactError(f"manifest {where}: input {graph_input.name!r} is {graph_input.dtype}; the Python "
                            "model can only produce float32, float16, int64 or int32")
    raw = TensorSpec(RAW_INPUTS[tower], "string", (1,))
    cfg: dict[str, Any] = {"clipexport_version": __version__, "model": manifest["model"], "tower": tower,
                           "input": raw.name, "output": graph_input.name, "dtype": graph_input.dtype}
    if tower == "image":
        if "preprocess" not in manifest:
            raise ArtifactError(f"{directory}: manifest has an image tower but no preprocess section")
        from clipexport.runtime.preprocess import PreprocessConfig

        size = PreprocessConfig.from_manifest(manifest["preprocess"]).size  # validates the section now
        dims: tuple[int, ...] = (3, *size)
        _check_dims(graph_input, dims, f"{where}: the graph takes {{}} but preprocess gives {list(dims)}")
        cfg["preprocess"] = dict(manifest["preprocess"])
        step_name = "preprocess"
    else:
        section = dict(manifest.get("tokenizer") or {})
        if not section:
            raise ArtifactError(f"{directory}: manifest has a text tower but no tokenizer section")
        if section.get("kind") == "none":
            # No tokenizer files in the artifact: serve the encoder alone (clients send token ids).
            notes.append(f"no tokenizer in the artifact ({section.get('reason', 'none recorded')}): only "
                               f"{encoder} is written for the text tower; send it token ids")
            return plan
        context_length = int(section.get("context_length", 77))
        dims = (context_length,)
        _check_dims(graph_input, dims, f"{where}: the graph takes {{}} tokens but the tokenizer makes {context_length}")
        if section.get("kind") == "hf":
            files = section.get("files") or [n for n in listed if n.startswith(f"{section.get('directory', 'tokenizer')}/")]
        else:
            files = [section["vocab"]] if section.get("vocab") else []
        plan.assets = [_relative(str(f), "tokenizer files") for f in files]
        for name in plan.assets:
            if name not in listed:
                raise ArtifactError(f"manifest tokenizer: {name} is not in the manifest's files (no sha256 to check)")
        cfg["tokenizer"] = section
        step_name = "tokenize"
    plan.raw = raw
    plan.converted = TensorSpec(graph_input.name, graph_input.dtype, dims)
    plan.python_cfg = cfg
    plan.models = TowerModels(tower, encoder, platform, f"{prefix}_{tower}_{step_name}", f"{prefix}_{tower}",
                              inputs, outputs)
    return plan


def _use_plan(tower: str, engine: Mapping[str, Any] | None, options: TritonOptions) -> bool:
    if options.backend == "onnxruntime":
        return False
    if options.backend == "tensorrt":
        if engine is None:
            raise UsageError(f"--backend tensorrt: the artifact has no TensorRT plan for the {tower} tower; build "
                             "one with `clipexport build --backend tensorrt` on the server's GPU, or use "
                             "--backend onnxruntime")
        if options.kind != "gpu":
            raise UsageError("--backend tensorrt needs --kind gpu: TensorRT plans run on a GPU only")
        return True
    # auto: a plan only where it can run at all
    return engine is not None and options.kind == "gpu"


def _check_dims(spec: TensorSpec, expected: tuple[int, ...], message: str) -> None:
    fits = len(spec.dims) == len(expected) and all(d in (-1, e) for d, e in zip(spec.dims, expected))
    if not fits:
        raise ArtifactError("manifest " + message.format(list(spec.dims)))


def _write_tower(directory: Path, root: Path, plan: _TowerPlan, batching: Batching, instances: Instances) -> None:
    models = plan.models
    header = plan.header + plan.notes

    # The tower graph.
    version_dir = root / models.encoder / VERSION
    version_dir.mkdir(parents=True)
    target = "model.plan" if models.platform == PLATFORM_PLAN else "model.onnx"
    shutil.copyfile(directory / plan.model_file, version_dir / target)
    for name in plan.extra_files:
        shutil.copyfile(directory / name, version_dir / name)
    if models.platform == PLATFORM_PYTHON:
        _write_python_encoder(version_dir, models)
        config = python_config(models.encoder, models.inputs, models.outputs, batching, instances)
    else:
        config = tower_config(models.encoder, models.platform, models.inputs, models.outputs, batching, instances)
    _write_text(root / models.encoder / "config.pbtxt", to_pbtxt(config, header))
    if models.preprocess is None or models.ensemble is None:
        return
    assert plan.raw is not None and plan.converted is not None and plan.python_cfg is not None

    # The Python-backend model: model.py (this package's python_model.py), its settings and assets.
    version_dir = root / models.preprocess / VERSION
    version_dir.mkdir(parents=True)
    shutil.copyfile(PYTHON_MODEL_FILE, version_dir / "model.py")
    _write_text(version_dir / PYTHON_CONFIG_FILE, json.dumps(plan.python_cfg, indent=2) + "\n")
    for name in plan.assets:
        (version_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(directory / name, version_dir / name)
    config = python_config(models.preprocess, [plan.raw], [plan.converted], batching, instances)
    _write_text(root / models.preprocess / "config.pbtxt", to_pbtxt(config, plan.header))

    # The ensemble: raw input -> Python model -> graph -> "embedding". Tensor names inside the
    # ensemble are the Python model's own, so each map reads name -> same name except the last.
    (root / models.ensemble / VERSION).mkdir(parents=True)
    embedding = TensorSpec(EMBEDDING, models.outputs[0].dtype, models.outputs[0].dims)
    steps = [
        Step(models.preprocess, {plan.raw.name: plan.raw.name}, {plan.converted.name: plan.converted.name}),
        Step(models.encoder, {plan.converted.name: plan.converted.name}, {models.outputs[0].name: EMBEDDING}),
    ]
    config = ensemble_config(models.ensemble, [plan.raw], [embedding], batching, steps)
    _write_text(root / models.ensemble / "config.pbtxt", to_pbtxt(config, plan.header))


def _write_python_encoder(version_dir: Path, models: TowerModels) -> None:
    """model.py (python_encoder.py) and its settings, beside the model.onnx already copied there."""
    shutil.copyfile(PYTHON_ENCODER_FILE, version_dir / "model.py")
    graph_input = models.inputs[0]
    cfg = {"clipexport_version": __version__, "tower": models.tower, "input": graph_input.name,
           "dtype": graph_input.dtype, "dims": list(graph_input.dims), "outputs": [o.name for o in models.outputs]}
    _write_text(version_dir / PYTHON_CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


__all__ = ["BACKENDS", "EMBEDDING", "ENCODERS", "PLATFORM_PYTHON", "RAW_INPUTS", "RepositoryResult", "TowerModels", "TritonOptions",
           "write_repository"]
