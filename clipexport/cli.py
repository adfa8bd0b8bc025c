"""Command line: a thin click layer over clipexport's Python API."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from clipexport.distributed.command import embed_dataset_command
from clipexport.errors import ClipExportError
from clipexport.serve.command import serve as serve_command
from clipexport.triton.command import triton as triton_command

PRECISION_NAMES = ["fp32", "fp16", "bf16", "int8", "fp8"]

EPILOG_BUILD = """\b
Examples:
  clipexport build ViT-B-32 --pretrained none          # offline: seeded random weights
  clipexport build ViT-L-14 --fp16 --pretrained none   # fp16 graphs (same as --precision fp16)
  clipexport build ViT-L-14 --pretrained datacomp_xl_s13b_b90k
  clipexport build RN50 --pretrained ./rn50.safetensors --towers image --batch 1:16:128
  clipexport build local-dir:./my-clip --pretrained none --out /tmp/my-clip
"""


def _fail(exc: ClipExportError) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


def _exit_interrupted() -> NoReturn:
    click.echo("interrupted: nothing was written", err=True)
    sys.exit(130)


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    # SIGTERM unwinds like Ctrl-C, so staging directories are cleaned up; STOP makes the next
    # stage boundary raise it again should a library catch this one.
    from clipexport.progress import STOP

    STOP.set()
    raise KeyboardInterrupt


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="clipexport")
def cli() -> None:
    """Export CLIP models to verified ONNX artifacts, one directory per build.

    Each build traces the image and text towers of an open_clip model into ONNX
    graphs with a dynamic batch axis, simplifies them, checks their numbers against
    PyTorch on ONNX Runtime, and writes image.onnx, text.onnx and manifest.json.
    """


@cli.command(epilog=EPILOG_BUILD)
@click.argument("model")
@click.option("--pretrained", metavar="TAG|PATH|none",
              help="Weights: an open_clip tag (downloads), a local .pt/.bin/.safetensors checkpoint, or 'none' "
                   "for seeded random weights. Default: the model's first published tag.")
@click.option("--towers", default="image,text", show_default=True, metavar="LIST",
              help="Comma-separated towers to build: image, text or both.")
@click.option("--precision", type=click.Choice(PRECISION_NAMES, case_sensitive=False), default=None,
              help="Numeric precision written into the graphs: fp16/bf16 (LayerNorm, softmax and the final "
                   "projection stay fp32), int8/fp8 (Q/DQ, per-channel weights, calibrated activations). "
                   "Default: fp32.")
@click.option("--fp32", "flag_fp32", is_flag=True, help="Same as --precision fp32.")
@click.option("--fp16", "flag_fp16", is_flag=True, help="Same as --precision fp16 (trtexec's and polygraphy's spelling).")
@click.option("--bf16", "flag_bf16", is_flag=True, help="Same as --precision bf16.")
@click.option("--int8", "flag_int8", is_flag=True, help="Same as --precision int8.")
@click.option("--fp8", "flag_fp8", is_flag=True, help="Same as --precision fp8.")
@click.option("--batch", metavar="MIN:OPT:MAX",
              help="Dynamic batch range, e.g. 1:8:64 (MAX at most 1024: parity runs at MIN and MAX). MIN == MAX "
                   "(e.g. 4:4:4) builds a graph fixed at that batch. Default: the recipe's.")
@click.option("--out", type=click.Path(path_type=Path), metavar="DIR",
              help="Output directory. Default: engines/<MODEL>-<pretrained>-<precision>.")
@click.option("--force", is_flag=True,
              help="Replace --out if it is an earlier artifact or empty (never a directory holding other files), "
                   "and only after the new build passed.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random weights and of the parity inputs.")
@click.option("--no-simplify", is_flag=True, help="Skip the simplification pass.")
@click.option("--no-fuse-attention", is_flag=True,
              help="Export attention as plain MatMul/Softmax/MatMul instead of one ONNX Attention node per block.")
@click.option("--calibration-images", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Images to calibrate int8/fp8 scales (and the fp16 range guard) on. Default: a built-in "
                   "synthetic set, recorded as such in the manifest.")
@click.option("--calibration-prompts", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Prompts (one per line) to calibrate the text tower on. Default: built-in prompts.")
@click.option("--accept-parity-failure", is_flag=True,
              help="Write the artifact even if parity fails; the manifest records that you accepted it.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="auto: also build verified TensorRT engines (.plan) when TensorRT and a CUDA GPU are present, "
                   "else stop after ONNX and say how to get engines. tensorrt: engines or an error before any work.")
@click.option("--no-rebuild", is_flag=True,
              help="Reuse the TensorRT engines stored in --out (with --force); fail instead of building when "
                   "they do not fit this graph, TensorRT, GPU, profile or precision.")
@click.option("--builder-memory-limit", type=click.IntRange(min=1), metavar="MIB",
              help="TensorRT builder workspace limit in MiB. Default: TensorRT's (the GPU's memory).")
@click.option("--builder-optimization-level", type=click.IntRange(0, 5), metavar="0-5",
              help="TensorRT builder optimization level (higher: longer builds, maybe faster engines). Default: 3.")
@click.option("--timing-cache", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="TensorRT timing cache file. Default: one per TensorRT version and GPU under ~/.cache/clipexport.")
@click.option("--external-data", is_flag=True,
              help="Write every tower's weights to ONNX external data (<tower>.onnx.data), as towers over "
                   "1.5 GB always are; a built-in CLIP is then also loaded one tower at a time. fp32, fp16 and "
                   "bf16 build this way; int8/fp8 do not.")
@click.option("--no-memory-check", is_flag=True,
              help="Try the build even when the least memory it needs (counted from the model's size before "
                   "anything loads) exceeds what this machine has available.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the output directory.")
def build(model: str, pretrained: str | None, towers: str, precision: str | None, flag_fp32: bool, flag_fp16: bool,
          flag_bf16: bool, flag_int8: bool, flag_fp8: bool, batch: str | None, out: Path | None,
          force: bool, seed: int, no_simplify: bool, no_fuse_attention: bool, calibration_images: Path | None,
          calibration_prompts: Path | None, accept_parity_failure: bool, backend: str, no_rebuild: bool,
          builder_memory_limit: int | None, builder_optimization_level: int | None, timing_cache: Path | None,
          external_data: bool, no_memory_check: bool, quiet: bool) -> None:
    """Build and verify ONNX towers of MODEL (see `clipexport list`)."""
    flags = [name for name, on in zip(PRECISION_NAMES, (flag_fp32, flag_fp16, flag_bf16, flag_int8, flag_fp8)) if on]
    asked = sorted({*flags, *([precision.lower()] if precision else [])})
    if len(asked) > 1:
        _fail(ClipExportError(f"precision given twice: {' and '.join(asked)}; choose one"))
    precision = asked[0] if asked else "fp32"
    from clipexport.build import BuildOptions
    from clipexport.build import build as run_build
    from clipexport.progress import Progress
    from clipexport.recipes import BatchRange

    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        options = BuildOptions(
            model=model,
            pretrained=pretrained,
            towers=[t.strip() for t in towers.split(",") if t.strip()],
            precision=precision,
            batch=BatchRange.parse(batch) if batch else None,
            out=out,
            force=force,
            seed=seed,
            disabled_passes=(["simplify"] if no_simplify else []) + (["fuse_attention"] if no_fuse_attention else []),
            accept_parity_failure=accept_parity_failure,
            calibration_images=calibration_images,
            calibration_prompts=calibration_prompts,
            backend=backend,
            no_rebuild=no_rebuild,
            builder_memory_limit=builder_memory_limit * 2**20 if builder_memory_limit else None,
            builder_optimization_level=builder_optimization_level,
            timing_cache=timing_cache,
            **({"large_tower_bytes": 0} if external_data else {}),
            memory_check=not no_memory_check,
        )
        result = run_build(options, Progress(quiet=quiet))
    except ClipExportError as exc:
        from clipexport.progress import STOP

        if not STOP.is_set():  # else: the interrupt, turned into an error by a library on the way
            _fail(exc)
        _exit_interrupted()
    except KeyboardInterrupt:
        _exit_interrupted()
    click.echo(str(result.out_dir))


@cli.command(name="list")
@click.option("--all", "show_all", is_flag=True, help="Also list the models no recipe covers, with the reason.")
def list_models(show_all: bool) -> None:
    """List recipes and the open_clip models each one covers."""
    from clipexport.listing import coverage

    try:
        covered, unsupported = coverage()
    except ClipExportError as exc:
        _fail(exc)
    for recipe, models in covered:
        click.echo(f"{recipe.name}: {recipe.summary}  [{recipe.path.name}]")
        if models:
            click.echo(f"  {len(models)} models: {', '.join(models)}")
        else:
            click.echo("  no open_clip names: build hf:DIR (a directory written by CLIPModel.save_pretrained)")
    click.echo(f"unsupported: {len(unsupported)} models" + ("" if show_all else " (--all lists them)"))
    if show_all:
        for name, reason in unsupported:
            click.echo(f"  {name}: {reason}")


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info(directory: Path, as_json: bool) -> None:
    """Summarize the manifest of an artifact DIRECTORY (checked as every command checks it)."""
    from clipexport.manifest import check_graphs, read_manifest

    try:
        manifest = read_manifest(directory)
        check_graphs(directory, manifest)  # cheap (no weights read); hashes are `verify --files-only`'s job
    except ClipExportError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(manifest.to_json(), indent=2))
        return
    from clipexport.info import describe

    click.echo(describe(directory, manifest))


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--files-only", is_flag=True, help="Only check files against their sha256; skip parity.")
@click.option("-q", "--quiet", is_flag=True)
def verify(directory: Path, files_only: bool, quiet: bool) -> None:
    """Re-check an artifact DIRECTORY: file hashes, then parity against the PyTorch reference."""
    from clipexport.build import verify_artifact
    from clipexport.progress import Progress

    try:
        result = verify_artifact(directory, Progress(quiet=quiet), files_only=files_only)
    except ClipExportError as exc:
        _fail(exc)
    towers = ", ".join(result["parity"]) or "skipped (--files-only)"
    click.echo(f"ok: {len(result['files'])} files match their sha256; parity (this clipexport's tolerance for "
               f"the precision): {towers}")


@cli.command()
@click.argument("target", metavar="DIR_OR_MODEL")
@click.option("--backends", default="torch,onnxruntime", show_default=True,
              help="Comma-separated: torch, torch-compile, onnxruntime, tensorrt. Unavailable ones are "
                   "reported as skipped with the reason.")
@click.option("--batch", "--batches", "batches", default="1,8,32", show_default=True, metavar="LIST",
              help="Batch sizes to time, comma-separated (a list: each is timed; `build --batch` is a range).")
@click.option("--tower", type=click.Choice(["image", "text", "both"]), default="both", show_default=True)
@click.option("--warm-up", "--warmup", "warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed runs before timing (polygraphy's --warm-up; --warmup also works).")
@click.option("--iterations", "--iters", "iters", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed runs per backend and batch (trtexec's --iterations; --iters also works).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--pretrained", default="none", show_default=True,
              help="When DIR_OR_MODEL is a model name: the weights of the fp32 artifact built first.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-report"), show_default=True,
              metavar="DIR", help="Where report.json, report.md and latency.png go.")
def bench(target: str, backends: str, batches: str, tower: str, warmup: int, iters: int, device: str,
          pretrained: str, out: Path) -> None:
    """Measure latency and throughput of an artifact's towers per backend and batch size.

    \b
    DIR_OR_MODEL is an artifact directory, or a model name: then an fp32 artifact is
    built first in a temporary directory. All backends run in this one process on the
    same inputs, with warm-up and GPU synchronization; the report adds FLOPs per item and
    the fraction of a large GEMM's FLOP/s measured in the same run.

    \b
    Example:
      clipexport bench engines/ViT-B-32-none-fp32 --batch 1,8 --backends torch,onnxruntime
    """
    import tempfile

    from clipexport.bench import BenchConfig, run_bench, write_report
    from clipexport.progress import Progress

    progress = Progress()
    try:
        config = BenchConfig(
            backends=[b.strip() for b in backends.split(",") if b.strip()],
            batches=[int(b) for b in batches.split(",") if b.strip()],
            towers=["image", "text"] if tower == "both" else [tower],
            warmup=warmup, iters=iters, device=device,
        )
        with tempfile.TemporaryDirectory(prefix="clipexport-bench-") as tmp:
            directory = Path(target)
            if not (directory / "manifest.json").is_file():
                from clipexport.build import BuildOptions
                from clipexport.build import build as run_build

                directory = run_build(BuildOptions(model=target, pretrained=pretrained, towers=config.towers,
                                                   out=Path(tmp) / "artifact"), progress).out_dir
            report = run_bench(directory, config, progress)
            paths = write_report(report, out)
    except ValueError as exc:
        _fail(ClipExportError(f"--batch: {exc}"))
    except ClipExportError as exc:
        _fail(exc)
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")


EPILOG_EMBED = """\b
Output:
  only --images, or only --texts   FILE.npy: float32 [N, D], one row per input, in order
  both                             FILE.npz (required): arrays image [Ni, D], text [Nt, D],
                                   image_paths and texts (strings, in row order)
  A .npz --out is also accepted for one kind. Rows are unit length unless --no-normalize.
  Load with numpy.load(FILE); no pickle is needed.

\b
Examples:
  clipexport embed engines/ViT-B-32-none-fp32 --images cat.jpg --images dog.png --out img.npy
  clipexport embed engines/ViT-B-32-none-fp32 --images photos/ --out photos.npy
  clipexport embed engines/ViT-B-32-none-fp32 -t "a photo of a cat" -t "a dog" --out txt.npy
  clipexport embed engines/ViT-B-32-none-fp32 -i cat.jpg -t "a cat" -t "a dog" --out both.npz
"""


@cli.command(epilog=EPILOG_EMBED)
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("-i", "--images", "images", multiple=True, type=click.Path(path_type=Path), metavar="PATH",
              help="An image file, or a directory (every image file in it, sorted by name). Repeat for more.")
@click.option("-t", "--texts", "texts", multiple=True, metavar="TEXT", help="A text to embed. Repeat for more.")
@click.option("--texts-file", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="A UTF-8 file with one text per line (empty lines skipped), after any --texts.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Where the embeddings go: .npy for one kind of input, .npz for both (see below).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "pytorch"]), default="auto",
              show_default=True, help="What runs the towers; 'auto' takes the first that works here.")
@click.option("--device", metavar="cpu|cuda|cuda:N", help="Default: the backend's best (CUDA if it has it).")
@click.option("--batch-size", type=int, metavar="N", help="Inputs per run. Default: 32, capped by the artifact.")
@click.option("--no-normalize", is_flag=True, help="Write raw embeddings instead of unit-length rows.")
def embed(directory: Path, images: tuple[Path, ...], texts: tuple[str, ...], texts_file: Path | None, out: Path,
          backend: str, device: str | None, batch_size: int | None, no_normalize: bool) -> None:
    """Embed images and/or texts with the artifact in DIRECTORY and save them with numpy.

    Images are preprocessed and texts tokenized exactly as open_clip does for the model;
    every artifact file is checked against its sha256 before anything runs.
    """
    import numpy as np

    from clipexport.errors import UsageError
    from clipexport.runtime import load

    try:
        all_texts = list(texts)
        if texts_file is not None:
            try:
                lines = texts_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"--texts-file {texts_file}: {exc}") from None
            all_texts += [line for line in lines if line.strip()]
        paths: list[Path] = []
        for path in images:
            if path.is_dir():
                from PIL import Image

                suffixes = {ext.lower() for ext in Image.registered_extensions()}
                found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
                if not found:
                    raise UsageError(f"--images {path}: the directory holds no image files")
                paths += found
            else:
                paths.append(path)
        if not paths and not all_texts:
            raise UsageError("nothing to embed: give --images and/or --texts (see --help)")
        both = bool(paths) and bool(all_texts)
        suffix = out.suffix.lower()
        if suffix not in (".npy", ".npz"):
            raise UsageError(f"--out {out}: use a .npy file (one kind of input) or a .npz file")
        if both and suffix != ".npz":
            raise UsageError(f"--out {out}: images and texts together are written as .npz (e.g. --out "
                             f"{out.with_suffix('.npz')}), with arrays image, text, image_paths, texts")
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: the directory {out.parent} does not exist")
        from clipexport.artifacts import check_writable

        check_writable(out)
        if out.is_dir():
            raise UsageError(f"--out {out}: is a directory; name a .npy or .npz file")
        runtime = load(directory, backend=backend, device=device)
        normalize = not no_normalize
        arrays: dict[str, np.ndarray] = {}
        if paths:
            arrays["image"] = runtime.encode_image([str(p) for p in paths], batch_size=batch_size, normalize=normalize)
            arrays["image_paths"] = np.array([str(p) for p in paths])
        if all_texts:
            arrays["text"] = runtime.encode_text(all_texts, batch_size=batch_size, normalize=normalize)
            arrays["texts"] = np.array(all_texts)
    except ClipExportError as exc:
        _fail(exc)
    # Write beside the target, then rename: a failed write never leaves a half file at --out.
    tmp = out.with_name(f".{out.name}.partial")
    with open(tmp, "wb") as fh:
        if suffix == ".npz":
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub types savez's **kwds as bool
        else:
            np.save(fh, arrays["image" if paths else "text"])
    tmp.replace(out)
    shapes = ", ".join(f"{k} {list(arrays[k].shape)}" for k in ("image", "text") if k in arrays)
    click.echo(f"wrote {out}: {shapes} float32 ({runtime.backend} on {runtime.device})")


# Commands that live with their subsystem (their heavy imports stay inside the commands).
cli.add_command(embed_dataset_command)
cli.add_command(triton_command)
cli.add_command(serve_command)


def main() -> None:
    cli(prog_name="clipexport")


if __name__ == "__main__":
    main()
