"""Command line: a thin click layer over clipexport's Python API."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from clipexport.errors import ClipExportError

EPILOG_BUILD = """\b
Examples:
  clipexport build ViT-B-32 --pretrained none          # offline: seeded random weights
  clipexport build ViT-L-14 --pretrained datacomp_xl_s13b_b90k
  clipexport build RN50 --pretrained ./rn50.safetensors --towers image --batch 1:16:128
  clipexport build local-dir:./my-clip --pretrained none --out /tmp/my-clip
"""


def _fail(exc: ClipExportError) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    # SIGTERM unwinds like Ctrl-C, so staging directories are cleaned up.
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
@click.option("--precision", type=click.Choice(["fp32"]), default="fp32", show_default=True,
              help="Numeric precision of the graphs.")
@click.option("--batch", metavar="MIN:OPT:MAX", help="Dynamic batch range, e.g. 1:8:64. Default: the recipe's.")
@click.option("--out", type=click.Path(path_type=Path), metavar="DIR",
              help="Output directory. Default: engines/<MODEL>-<pretrained>-<precision>.")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only after the new build passed).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random weights and of the parity inputs.")
@click.option("--no-simplify", is_flag=True, help="Skip the simplification pass.")
@click.option("--accept-parity-failure", is_flag=True,
              help="Write the artifact even if parity fails; the manifest records that you accepted it.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the output directory.")
def build(model: str, pretrained: str | None, towers: str, precision: str, batch: str | None, out: Path | None,
          force: bool, seed: int, no_simplify: bool, accept_parity_failure: bool, quiet: bool) -> None:
    """Build and verify ONNX towers of MODEL (see `clipexport list`)."""
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
            disabled_passes=["simplify"] if no_simplify else [],
            accept_parity_failure=accept_parity_failure,
        )
        result = run_build(options, Progress(quiet=quiet))
    except ClipExportError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)
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
        click.echo(f"  {len(models)} models: {', '.join(models)}")
    click.echo(f"unsupported: {len(unsupported)} models" + ("" if show_all else " (--all lists them)"))
    if show_all:
        for name, reason in unsupported:
            click.echo(f"  {name}: {reason}")


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info(directory: Path, as_json: bool) -> None:
    """Summarize the manifest of an artifact DIRECTORY."""
    from clipexport.artifacts import read_manifest

    try:
        manifest = read_manifest(directory)
    except ClipExportError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    weights = manifest.get("weights", {})
    click.echo(f"{directory}: {manifest['model']} ({manifest.get('recipe')}), weights {weights.get('kind')} "
               f"{weights.get('value')}, {manifest['precision']}, batch {manifest.get('batch')}")
    click.echo(f"built {manifest.get('created')} with clipexport {manifest.get('clipexport_version')}, "
               f"torch {manifest['versions'].get('torch')}, onnx {manifest['versions'].get('onnx')}, "
               f"onnxruntime {manifest['versions'].get('onnxruntime')}")
    for tower, t in manifest["towers"].items():
        ins = ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in t["inputs"])
        outs = ", ".join(f"{o['name']} {o['dtype']}{o['shape']}" for o in t["outputs"])
        p = t["parity"]
        passes = ", ".join(f"{r['name']} {r['status']} {r['nodes_before']}->{r['nodes_after']}" for r in t["passes"])
        click.echo(f"  {tower}: {t['onnx']}  {ins} -> {outs}")
        click.echo(f"    passes: {passes or 'none'}")
        click.echo(f"    parity ({p['backend']}): cosine_min {p['cosine_min']:.7f}, max_abs_err {p['max_abs_err']:.3g}, "
                   f"max_rel_err {p['max_rel_err']:.3g}, {'passed' if p['passed'] else 'FAILED'}")
    if manifest.get("parity_accepted_by_user"):
        click.echo("  warning: built with --accept-parity-failure")


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
    towers = ", ".join(result["parity"]) or "skipped"
    click.echo(f"ok: {len(result['files'])} files match their sha256; parity: {towers}")


@cli.command()
@click.argument("target", metavar="DIR_OR_MODEL")
@click.option("--backends", default="torch,onnxruntime", show_default=True,
              help="Comma-separated: torch, torch-compile, onnxruntime, tensorrt. Unavailable ones are "
                   "reported as skipped with the reason.")
@click.option("--batch", "batches", default="1,8,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--tower", type=click.Choice(["image", "text", "both"]), default="both", show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed runs before timing.")
@click.option("--iters", type=int, default=10, show_default=True, help="Timed runs per backend and batch.")
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


def main() -> None:
    cli(prog_name="clipexport")


if __name__ == "__main__":
    main()
