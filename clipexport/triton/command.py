"""`clipexport triton`: the click command over clipexport.triton.write_repository."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from clipexport.errors import ClipExportError

EPILOG = """\b
Writes, per tower (image, text), three models into REPO:
  clip_image_preprocess  Python backend: image file bytes -> pixels (clipexport's preprocessing)
  clip_image_encoder     the tower: ONNX Runtime, or the artifact's TensorRT plan
                         (--encoder python: ONNX Runtime inside Triton's Python backend)
  clip_image             ensemble of both: "image" TYPE_STRING [1] -> "embedding" FP32 [D]
  (text: clip_text_tokenize, clip_text_encoder, clip_text with input "text")
Embeddings are not normalized. Triton's Python needs `pip install 'clipexport[runtime]'`.

\b
Examples:
  clipexport triton engines/ViT-B-32-none-fp32 --out triton-repo
  clipexport triton engines/ViT-B-32-none-fp32 --out triton-repo --kind cpu --instances 2 --force
  clipexport triton engines/ViT-B-32-none-fp32 --out triton-repo --encoder python --kind cpu
"""


@click.command(name="triton", epilog=EPILOG)
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), metavar="REPO",
              help="The model repository to write (replaced only with --force).")
@click.option("--towers", metavar="LIST", help="Comma-separated: image, text. Default: every tower of the artifact.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="What runs each tower: auto takes the artifact's TensorRT plan when it has one and --kind is "
                   "gpu, else the ONNX graph.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Instances of each model (instance_group count).")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Where the towers run (the Python preprocessing always runs on CPU).")
@click.option("--max-queue-delay", "max_queue_delay_us", type=click.IntRange(min=0), default=100, show_default=True,
              metavar="US", help="Dynamic batcher: microseconds a request may wait for a fuller batch.")
@click.option("--prefix", default="clip", show_default=True, help="Model names: PREFIX_image, PREFIX_text_encoder...")
@click.option("--encoder", type=click.Choice(["native", "python"]), default="native", show_default=True,
              help="native: Triton's onnxruntime/tensorrt backend runs each tower; python: ONNX Runtime inside "
                   "Triton's Python backend (servers without the onnxruntime backend, e.g. nvidia-pytriton's).")
@click.option("--force", is_flag=True, help="Replace REPO if it exists (only after the new one is complete).")
def triton(directory: Path, out: Path, towers: str | None, backend: str, instances: int, kind: str,
           max_queue_delay_us: int, prefix: str, encoder: str, force: bool) -> None:
    """Write a Triton Inference Server model repository for the artifact in DIRECTORY.

    The artifact's files are checked against manifest.json first; the repository is
    written next to REPO and renamed into place, so a failure leaves nothing behind.
    """
    from clipexport.triton.repository import TritonOptions, write_repository

    try:
        result = write_repository(directory, TritonOptions(
            out=out,
            towers=tuple(t.strip() for t in towers.split(",") if t.strip()) if towers is not None else None,
            backend=backend, instances=instances, kind=kind, max_queue_delay_us=max_queue_delay_us,
            prefix=prefix, force=force, encoder=encoder,
        ))
    except ClipExportError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"wrote {result.out}")
    for t in result.towers:
        if t.ensemble:
            click.echo(f"  {t.ensemble}: {t.preprocess} -> {t.encoder} ({t.platform})")
        else:
            click.echo(f"  {t.encoder} ({t.platform}), no ensemble")
    for note in result.notes:
        click.echo(f"  note: {note}")
