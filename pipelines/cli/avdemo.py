"""``fuse-avdemo``: the audio-visual worked example end to end (see :mod:`pipelines.avdemo`)."""

import os
import time
from pathlib import Path

import click

from ..avdemo import run_avdemo, table
from .common import cli_errors, setup_logging


@click.command(context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), default="avdemo", help="Working folder.")
@click.option("--clips", type=click.IntRange(min=10), default=3000,
              help="Synthetic clips (a frame and a 1 s sound; 7 questions each).")
@click.option("--steps", type=click.IntRange(min=1), default=2400, help="Training steps of each of the three models.")
@click.option("--seed", type=int, default=0)
@click.option("--parallel", type=click.IntRange(min=1, max=3), default=3 if (os.cpu_count() or 1) > 1 else 1,
              help="Trainings at once, each in its own process with a share of the CPUs "
                   "(1: one after another in this process).")
def main(out, clips, steps, seed, parallel):
    """Where should the image and the sound join? Run the audio-visual example end to end on a CPU.

    Stages: `vqa-data avshapes`, `embed` the frames (the shipped demo ViT) and `embed --modality
    audio` the sounds (the shipped demo AST), `vqa-data shards`, then `fuse-train --preset demo`
    with the frame and the sound, with the frame alone and with the sound alone (side by side, one
    process each); the table breaks accuracy down by what the questions need. Rerunning skips
    finished stages.

    Example:

        fuse-avdemo --out avdemo
    """
    setup_logging()
    out = Path(out)
    t = time.perf_counter()
    with cli_errors():
        done = run_avdemo(out, clips, steps, seed, click.echo, parallel=parallel)
    click.echo("")
    click.echo(table(out, done["results"]))
    click.echo(f"total {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
