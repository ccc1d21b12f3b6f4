"""``vqa-data``: write the synthetic shapes dataset, QA shards, and check shards against caches."""

import functools
import json
import logging
import sys

import click

from ..data.vqa import MAX_QUESTION_CHARS
from .common import cli_errors, parse_caches, setup_logging


def _fail_cleanly(fn):
    """Bad settings exit 2 (usage), library errors 1, each with one line on stderr."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with cli_errors():
            return fn(*args, **kwargs)

    return wrapper


@click.group()
@click.version_option(package_name="where-to-fuse")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose):
    """Data steps of stage 2: the synthetic shapes dataset, QA shards, cache checks.

    Example:

    \b
        vqa-data shapes data/shapes --images 2000
        vqa-data shards data/shapes data/qa
    """
    setup_logging(logging.INFO if verbose else logging.WARNING)


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--images", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Number of images.")
@click.option("--seed", default=0, show_default=True, help="Seed: the same seed writes the same bytes.")
@click.option("--size", default=96, show_default=True, help="Image side in pixels.")
@click.option("--questions-per-image", default=5, show_default=True)
@click.option("--split", default="train", show_default=True, help="Split name in the file names.")
@_fail_cleanly
def shapes(out, images, seed, size, questions_per_image, split):
    """Write the synthetic shapes dataset to OUT in the VQA v2 layout.

    Coloured shapes on a 3x3 grid; questions about colour, shape, presence, count, position and
    relations, 10 answers each. Prints the question-only baseline (answering from the question
    text alone, fitted on 80% of the images, scored on the rest).

    Example:

    \b
        vqa-data shapes data/shapes --images 2000 --seed 0
    """
    from ..data.shapes import held_out_baseline, write_shapes

    with click.progressbar(length=images, label="images", file=sys.stderr) as bar:
        summary = write_shapes(out, images=images, seed=seed, size=size, split=split,
                               questions_per_image=questions_per_image, progress=bar.update)
    line = (f"wrote {summary['images']} images, {summary['questions']} questions to {out} "
            f"({', '.join(f'{k}: {v}' for k, v in summary['answer_types'].items())})")
    baseline = held_out_baseline(out, split, seed)
    if baseline is not None:
        line += f"; question-only baseline {100 * baseline:.1f}%"
    click.echo(line)


@cli.command()
@click.argument("vqa_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--split-by", type=click.Choice(["image", "question"]), default="image", show_default=True,
              help="image: no image on both sides; question: a random slice of questions.")
@click.option("--seed", default=0, show_default=True)
@click.option("--eval-fraction", default=0.2, show_default=True)
@click.option("--shard-size", default=1000, show_default=True, help="Records per shard at most.")
@click.option("--splits", default=None, help="Comma-separated splits of VQA_DIR to pool [all found].")
@click.option("--no-check-images", is_flag=True, help="Do not require the image files to exist.")
@click.option("--max-question-chars", type=click.IntRange(min=1), default=MAX_QUESTION_CHARS, show_default=True,
              help="Refuse a question longer than this (VQA v2 questions are under 300 characters).")
@_fail_cleanly
def shards(vqa_dir, out, split_by, seed, eval_fraction, shard_size, splits, no_check_images, max_question_chars):
    """Split a VQA v2 folder into train and eval and write them as WebDataset shards to OUT.

    VQA_DIR is the official layout (or `vqa-data shapes` output); all its splits are pooled and
    split 80/20. OUT gets train-*.tar, eval-*.tar and manifest.json. A record that cannot be used
    (an empty question or one over --max-question-chars, ten empty answers) stops it with its
    question id.

    Example:

    \b
        vqa-data shards data/shapes data/qa --split-by image --seed 0
    """
    from ..data.shards import write_qa_shards

    manifest = write_qa_shards(vqa_dir, out, split_by=split_by, seed=seed, eval_fraction=eval_fraction,
                               shard_size=shard_size, splits=splits.split(",") if splits else None,
                               check_images=not no_check_images, max_question_chars=max_question_chars)
    t, e = manifest["train"], manifest["eval"]
    click.echo(f"train: {t['count']} questions, {t['images']} images, {len(t['shards'])} shards; "
               f"eval: {e['count']} questions, {e['images']} images, {len(e['shards'])} shards -> {out}")


@cli.command()
@click.argument("shard_dir", type=click.Path(file_okay=False))
@click.option("--cache", "caches", multiple=True, required=True, metavar="NAME=PATH",
              help="A vector modality's cache; repeat for several modalities.")
@click.option("--expect", default=None, metavar="JSON",
              help='Expected metadata per modality, e.g. \'{"image": {"shape": [196, 768]}}\'.')
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_fail_cleanly
def check(shard_dir, caches, expect, as_json):
    """Check that the caches hold an embedding for every record of SHARD_DIR (train and eval).

    Exits 1 naming the missing ids (up to 5 examples per cache), or a cache whose metadata differs
    from --expect.

    Example:

    \b
        vqa-data check data/qa --cache image=cache/ --expect '{"image": {"shape": [196, 768]}}'
    """
    from ..data.stream import check_shards

    try:
        expect = json.loads(expect) if expect else {}
    except ValueError as e:
        raise click.UsageError(f"--expect: not valid JSON ({e})") from None
    caches = parse_caches(caches)
    report = check_shards(shard_dir, caches, expect)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"ok: every id of {report['train']['records']} train and {report['eval']['records']} "
                   f"eval records is in {', '.join(f'{k}={v}' for k, v in caches.items())}")


def main():
    cli()


if __name__ == "__main__":
    main()
