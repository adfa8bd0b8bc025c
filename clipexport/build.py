"""The build: model -> towers -> ONNX -> passes -> parity -> artifact directory.

Everything the CLI's `build` and `verify` do lives here, so the Python API has it too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from clipexport import __version__
from clipexport.artifacts import (
    FORMAT_VERSION,
    StagingDir,
    check_files,
    check_out_dir,
    default_out_dir,
    library_versions,
    read_manifest,
    save_onnx,
    tensor_infos,
    write_manifest,
)
from clipexport.errors import ParityError, UsageError, WeightsError
from clipexport.hashing import file_sha256
from clipexport.models.architecture import families_of
from clipexport.models.open_clip_source import (
    ReferenceModel,
    canonical_name,
    default_pretrained,
    known_tags,
    load_reference,
    model_config,
)
from clipexport.models.weights import FILE, parse_pretrained
from clipexport.progress import Progress
from clipexport.tokenizer_assets import write_tokenizer_assets
from clipexport.recipes import TOWERS, BatchRange, Recipe, Tolerance, TowerSpec, recipe_for
from clipexport.verify import OnnxRuntimeCandidate, TowerParity, check_tower, image_inputs, text_inputs

PRECISIONS = ("fp32",)


@dataclass
class BuildOptions:
    model: str
    pretrained: str | None = None  # None: the model's default tag
    towers: Sequence[str] = TOWERS
    precision: str = "fp32"
    batch: BatchRange | None = None  # None: the recipe's range
    out: Path | None = None  # None: engines/<MODEL>-<pretrained>-<precision>
    force: bool = False
    seed: int = 0
    disabled_passes: Sequence[str] = ()
    accept_parity_failure: bool = False


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    parity: dict[str, TowerParity] = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    """Everything decided before any weights are loaded or any file is written."""

    name: str
    recipe: Recipe
    towers: tuple[str, ...]
    batch: BatchRange
    out: Path


def plan_build(options: BuildOptions) -> _Plan:
    """Validate the request up front: bad input fails here, before any work or any file."""
    name = canonical_name(options.model)
    recipe = recipe_for(families_of(model_config(name)), name)
    if options.precision not in PRECISIONS:
        raise UsageError(f"--precision {options.precision!r}: this version builds {', '.join(PRECISIONS)}")
    recipe.tolerance(options.precision)
    towers = tuple(dict.fromkeys(options.towers))
    bad = [t for t in towers if t not in recipe.towers]
    if bad or not towers:
        raise UsageError(f"--towers: unknown tower {bad[0] if bad else '(none)'}; choose from {', '.join(recipe.towers)}")
    weights = parse_pretrained(options.pretrained or default_pretrained(name), options.seed, known_tags(name), name)
    out = options.out or default_out_dir(name, weights.label, options.precision)
    check_out_dir(out, options.force)
    return _Plan(name=name, recipe=recipe, towers=towers, batch=options.batch or recipe.batch, out=out)


def parity_batch_sizes(recipe: Recipe, batch: BatchRange) -> list[int]:
    """The recipe's parity batch sizes that fit the build's range, plus its smallest batch."""
    sizes = {b for b in recipe.parity_batch_sizes if batch.min <= b <= batch.max}
    sizes.add(batch.min)
    return sorted(sizes)


def _example_input(ref: ReferenceModel, tower: str) -> Any:
    import torch

    if tower == "image":
        return torch.randn(2, 3, ref.image_size, ref.image_size, generator=torch.Generator().manual_seed(1))
    return ref.tokenizer()(["a photo of a dog.", "a diagram"])


def _tower_module(ref: ReferenceModel, tower: str) -> Any:
    from clipexport.models.towers import image_tower, text_tower

    return image_tower(ref.model) if tower == "image" else text_tower(ref.model)


def tower_parity(
    ref: ReferenceModel,
    tower: str,
    module: Any,
    onnx_path: Path,
    spec: TowerSpec,
    tolerance: Tolerance,
    batch_sizes: Sequence[int],
    seed: int,
    precision: str,
) -> TowerParity:
    """Reference tower vs its ONNX file on ONNX Runtime, on random pixels or real prompts."""
    if tower == "image":
        inputs = image_inputs(batch_sizes, ref.image_size, seed)
    else:
        inputs = text_inputs(batch_sizes, ref.tokenizer())
    candidate = OnnxRuntimeCandidate(onnx_path, spec.input_name)
    return check_tower(tower, module, candidate, inputs, tolerance, candidate.backend, precision)


def build(options: BuildOptions, progress: Progress | None = None) -> BuildResult:
    """Build, verify and write an artifact directory; on any failure nothing is left at the target."""
    from clipexport.export import export_tower
    from clipexport.passes import PassConfig, run_passes

    progress = progress or Progress(quiet=True)
    plan = plan_build(options)
    started = time.perf_counter()
    progress.say(f"clipexport build {plan.name} (recipe {plan.recipe.name}, towers {', '.join(plan.towers)}, "
                 f"batch {plan.batch}, {options.precision}) -> {plan.out}")
    with progress.stage("load reference model"):
        ref = load_reference(plan.name, options.pretrained, options.seed)
    for note in ref.notes:
        progress.say(f"  note: {note}")
    tolerance = plan.recipe.tolerance(options.precision)
    sizes = parity_batch_sizes(plan.recipe, plan.batch)
    towers_json: dict[str, Any] = {}
    files: dict[str, str] = {}
    parities: dict[str, TowerParity] = {}

    with StagingDir(plan.out, options.force) as staging:
        assert staging.path is not None
        for tower in plan.towers:
            spec = plan.recipe.towers[tower]
            module = _tower_module(ref, tower)
            tower_start = time.perf_counter()
            with progress.stage(f"export {tower} tower"):
                graph = export_tower(module, _example_input(ref, tower), spec, plan.batch, plan.recipe.opset)
            with progress.stage(f"optimize {tower} tower"):
                graph, records = run_passes(
                    graph, PassConfig(tower=tower, precision=options.precision), options.disabled_passes,
                    log=lambda msg: progress.say(f"    {msg}"),
                )
            onnx_path = staging.path / f"{tower}.onnx"
            written = save_onnx(graph, onnx_path)
            inputs, outputs = tensor_infos(graph.graph.input), tensor_infos(graph.graph.output)
            del graph
            with progress.stage(f"verify {tower} tower (batches {sizes})"):
                parity = tower_parity(ref, tower, module, onnx_path, spec, tolerance, sizes, options.seed,
                                      options.precision)
            progress.say(f"    {parity.summary()}")
            parities[tower] = parity
            for name in written:
                files[name] = file_sha256(staging.path / name)
            towers_json[tower] = {
                "onnx": onnx_path.name,
                "files": written,
                "sha256": files[onnx_path.name],
                "inputs": inputs,
                "outputs": outputs,
                "passes": [r.to_json() for r in records],
                "parity": parity.to_json(),
                "seconds": round(time.perf_counter() - tower_start, 2),
            }
        if "text" in plan.towers:
            tokenizer, written = write_tokenizer_assets(ref.model_cfg["text_cfg"], staging.path)
            files.update({name: file_sha256(staging.path / name) for name in written})
        else:
            tokenizer = {"context_length": ref.context_length}
        failed = [p for p in parities.values() if not p.passed]
        if failed and not options.accept_parity_failure:
            raise ParityError(
                "parity outside the recipe's tolerance; nothing was written:\n  "
                + "\n  ".join(p.summary() for p in failed)
            )
        manifest = _manifest(ref, plan, options, towers_json, files, tokenizer, sizes,
                             time.perf_counter() - started, failed)
        write_manifest(staging.path, manifest)
        staging.commit()
    progress.say(f"wrote {plan.out} in {time.perf_counter() - started:.1f}s")
    return BuildResult(out_dir=plan.out, manifest=manifest, parity=parities)


def _manifest(
    ref: ReferenceModel,
    plan: _Plan,
    options: BuildOptions,
    towers: dict[str, Any],
    files: dict[str, str],
    tokenizer: dict[str, Any],
    parity_batches: list[int],
    seconds: float,
    failed: list[TowerParity],
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "clipexport_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": ref.name,
        "pretrained": ref.weights.value,
        "weights": ref.weights.to_json(),
        "precision": options.precision,
        "recipe": plan.recipe.name,
        "families": {"image": ref.families.image, "text": ref.families.text},
        "model_config": ref.model_cfg,
        "opset": plan.recipe.opset,
        "batch": {"min": plan.batch.min, "opt": plan.batch.opt, "max": plan.batch.max},
        "preprocess": ref.preprocess_config(),
        "tokenizer": tokenizer,
        "versions": library_versions(),
        "parity_batch_sizes": parity_batches,
        "parity_accepted_by_user": bool(failed),
        "notes": ref.notes,
        "seconds": round(seconds, 2),
        "towers": towers,
        "files": files,
    }


def verify_artifact(directory: Path, progress: Progress | None = None, files_only: bool = False) -> dict[str, Any]:
    """Re-check an artifact: every file against its sha256, then parity against a rebuilt reference.

    Returns {"files": [...], "parity": {tower: TowerParity}}; raises ArtifactError or ParityError.
    """
    progress = progress or Progress(quiet=True)
    directory = Path(directory)
    manifest = read_manifest(directory)
    with progress.stage("check files against manifest sha256"):
        checked = check_files(directory, manifest)
    result: dict[str, Any] = {"files": checked, "parity": {}}
    if files_only:
        return result
    weights = manifest["weights"]
    if weights["kind"] == FILE:
        path = Path(weights["value"])
        if not path.is_file():
            raise WeightsError(f"the checkpoint this artifact was built from is gone: {path} (use --files-only)")
        if file_sha256(path) != weights["sha256"]:
            raise WeightsError(f"the checkpoint {path} changed since the build (sha256 differs)")
    with progress.stage("load reference model"):
        ref = load_reference(manifest["model"], weights["value"], int(weights["seed"]))
    recipe = recipe_for(ref.families, ref.name)
    for tower, info in manifest["towers"].items():
        spec = recipe.towers[tower]
        tol = Tolerance(**info["parity"]["tolerance"])
        sizes = manifest["parity_batch_sizes"]
        with progress.stage(f"verify {tower} tower"):
            parity = tower_parity(ref, tower, _tower_module(ref, tower), directory / info["onnx"], spec, tol,
                                  sizes, int(weights["seed"]), manifest["precision"])
        progress.say(f"    {parity.summary()}")
        result["parity"][tower] = parity
    failed = [p for p in result["parity"].values() if not p.passed]
    if failed:
        raise ParityError("parity outside tolerance:\n  " + "\n  ".join(p.summary() for p in failed))
    return result


__all__ = ["BuildOptions", "BuildResult", "build", "plan_build", "verify_artifact"]
