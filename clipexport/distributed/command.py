"""The `clipexport embed-dataset` command: a thin click layer over embed_dataset().

Imports only click at module level, so `clipexport --help` never imports Ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from clipexport.errors import ClipExportError

EPILOG = """\b
Output (OUT_DIR):
  part-NNNNN.parquet          id, embedding (fixed-size list of float32 or float16); one row
                              per readable input, in input order; the file metadata holds
                              clipexport.manifest_sha256 (sha256 of the artifact's manifest.json)
  errors/part-NNNNN.parquet   id, reason: inputs that could not be read
  _SUCCESS                    JSON totals, written when every shard is complete
For image files the id is the file's absolute path.

\b
Examples:
  clipexport embed-dataset engines/ViT-B-32-none-fp32 --input 'photos/**/*.jpg' --output emb/ --actors 2
  clipexport embed-dataset engines/ViT-B-32-none-fp32 --input data/*.parquet --image-column jpg \\
      --id-column key --output emb/ --address auto --actors 8 --gpus-per-actor 0.5 --dtype float16
  clipexport embed-dataset engines/ViT-B-32-none-fp32 --input captions.parquet --tower text --output txt/
  clipexport embed-dataset engines/ViT-B-32-none-fp32 --input 'photos/**/*.jpg' --output emb/ --resume
"""


@click.command(name="embed-dataset", epilog=EPILOG)
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--input", "input_", required=True, metavar="PATH_OR_GLOB",
              help="Image files or Parquet files: a file, a directory (searched recursively) or a glob.")
@click.option("--output", required=True, type=click.Path(path_type=Path, file_okay=False), metavar="OUT_DIR",
              help="Directory for the Parquet shards.")
@click.option("--tower", type=click.Choice(["image", "text"]), default="image", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True, metavar="N",
              help="Rows per actor call; at most the artifact's verified batch maximum.")
@click.option("--actors", type=int, default=1, show_default=True, metavar="N",
              help="Actors in the pool; each loads the artifact once.")
@click.option("--gpus-per-actor", type=float, default=0.0, show_default=True, metavar="F",
              help="GPUs per actor (0: CPU; 0.5: two actors share a GPU).")
@click.option("--cpus-per-actor", type=float, default=1.0, show_default=True, metavar="F")
@click.option("--address", default="local", show_default=True, metavar="auto|local|ADDR",
              help="local: start Ray in this process; auto: join the running cluster; or a Ray address.")
@click.option("--num-cpus", type=int, metavar="N", help="CPUs of the local Ray (--address local). Default: all.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--no-normalize", is_flag=True, help="Write raw embeddings instead of unit-length rows.")
@click.option("--shard-size", type=int, default=1000, show_default=True, metavar="N",
              help="Input rows per output shard; keep it the same for --resume.")
@click.option("--id-column", metavar="NAME", help="Parquet: the id column. Default: 'id' if present, else FILE#ROW.")
@click.option("--image-column", metavar="NAME",
              help="Parquet: image bytes (or a {bytes, path} struct, or paths). Default: 'image'.")
@click.option("--text-column", metavar="NAME", help="Parquet: the texts (--tower text). Default: 'text'.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "pytorch"]), default="auto",
              show_default=True)
@click.option("--device", metavar="cpu|cuda|cuda:N",
              help="Default: cpu, or cuda when --gpus-per-actor is above 0.")
@click.option("--resume", is_flag=True, help="Keep shards already complete for these inputs and artifact.")
@click.option("--force", is_flag=True, help="Delete earlier outputs of this command in OUT_DIR first.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary.")
def embed_dataset_command(directory: Path, input_: str, output: Path, tower: str, batch_size: int, actors: int,
                          gpus_per_actor: float, cpus_per_actor: float, address: str, num_cpus: int | None,
                          dtype: str, no_normalize: bool, shard_size: int, id_column: str | None,
                          image_column: str | None, text_column: str | None, backend: str, device: str | None,
                          resume: bool, force: bool, quiet: bool) -> None:
    """Embed a dataset of images or texts with the artifact in DIRECTORY, on Ray Data.

    \b
    Inputs are sorted and cut into fixed shards; an actor pool (one Runtime per actor)
    embeds them and each shard is written atomically with its manifest hash, so --resume
    after a crash writes only the missing shards. Unreadable images go to errors/ with the
    reason; every input row ends up in exactly one of the two.
    """
    from clipexport.distributed.job import EmbedDatasetOptions, embed_dataset
    from clipexport.progress import Progress

    try:
        options = EmbedDatasetOptions(
            artifact=directory, input=input_, out_dir=output, tower=tower, batch_size=batch_size, actors=actors,
            gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, address=address, num_cpus=num_cpus,
            dtype=dtype, normalize=not no_normalize, shard_size=shard_size, id_column=id_column,
            image_column=image_column, text_column=text_column, backend=backend, device=device, resume=resume,
            force=force,
        )
        result = embed_dataset(options, Progress(quiet=quiet))
    except ClipExportError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"wrote {result.out_dir}: {result.embedded} embeddings, {result.errors} errors, {result.shards} "
               f"shards ({result.shards_written} written, {result.shards_skipped} already complete) in "
               f"{result.seconds:.1f}s")
