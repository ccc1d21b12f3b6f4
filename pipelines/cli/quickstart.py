"""``fuse-quickstart``: the main job end to end on the built-in shapes data (see :mod:`pipelines.quickstart`)."""

import time
from pathlib import Path

import click

from ..quickstart import run_quickstart, table
from ..train.config import TrainConfig
from .common import cli_errors, setup_logging


@click.command(context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), default="quickstart", help="Working folder.")
@click.option("--images", type=int, default=15000, help="Synthetic images (5 questions each).")
@click.option("--steps", type=int, default=TrainConfig.resolve("demo").steps, help="Training steps of the fused model.")
@click.option("--question-only-steps", type=int, default=500,
              help="Steps of the question-only model (it learns the answer priors in a few hundred, at lr 2e-3).")
@click.option("--seed", type=int, default=0)
def main(out, images, steps, question_only_steps, seed):
    """Run the main job end to end on the built-in shapes data and print accuracy with and without the image.

    Stages: `vqa-data shapes`, `embed` (the shipped demo ViT), `vqa-data shards`, then `fuse-train
    --preset demo` with the image and on the question alone. Rerunning skips finished stages.

    Example:

        fuse-quickstart --out quickstart
    """
    setup_logging()
    out = Path(out)
    t = time.perf_counter()
    with cli_errors():
        done = run_quickstart(out, images, steps, question_only_steps, seed, click.echo)
    click.echo("")
    click.echo(table(out, done["results"]))
    click.echo(f"total {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
