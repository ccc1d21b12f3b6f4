"""``fuse-eval``: score a checkpoint on a side of the shards, or answer one question about one image
(see :mod:`pipelines.train.evaluate`)."""

import json

import click

from .common import cli_errors, parse_caches, setup_logging


@click.command(context_settings={"show_default": True})
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--shards", type=click.Path(exists=True, file_okay=False), help="Folder written by `vqa-data shards`.")
@click.option("--cache", "caches", multiple=True, metavar="MODALITY=PATH",
              help="Embedding caches (default: the ones the run trained with).")
@click.option("--side", type=click.Choice(["eval", "train"]), default="eval", help="Which side of the shards.")
@click.option("--batch-size", type=int, default=128)
@click.option("--limit", type=click.IntRange(min=0), help="Score at most N questions (0: all).")
@click.option("--allow-missing", is_flag=True,
              help="Drop questions whose id a cache lacks, and count them (on if the run trained so).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Answer one question about this image.")
@click.option("--question", help="The question to answer about --image.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def main(checkpoint, shards, caches, side, batch_size, limit, allow_missing, image, question, as_json):
    """Score a fuse-train checkpoint with the official VQA accuracy, or answer one question.

    CHECKPOINT is a run directory (its best checkpoint is used) or a checkpoint folder.

    Example:

    \b
        fuse-eval runs/demo --shards runs/qa
        fuse-eval runs/demo --image shapes/train2014/COCO_train2014_000000000001.jpg --question "What color is the circle?"
    """
    setup_logging()
    if (image is None) != (question is None):
        raise click.UsageError("--image and --question go together")
    from ..train.checkpoint import load_checkpoint
    from ..train.evaluate import answer_one, score

    caches = parse_caches(caches) if caches else None
    with cli_errors():
        model, run, tokenizer, ckpt = load_checkpoint(checkpoint)
        if image:
            answer = answer_one(model, run, tokenizer, image, question)
            click.echo(json.dumps({"question": question, "image": image, "answer": answer}) if as_json else answer)
            return
        summary = score(model, run, tokenizer, shards, caches, side, batch_size, limit, allow_missing)
    summary["checkpoint"] = str(ckpt)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(format_summary(summary, f"{ckpt}: {summary['count']} questions ({side} side)"))


def format_summary(summary: dict, title: str) -> str:
    """A table of VQA accuracy and exact match, overall, by answer type and by question type."""
    lines = [title]
    rows = [("all", summary), *summary["by_answer_type"].items()]
    if summary["by_question_type"]:
        rows += [("", None), ("question type", None), *summary["by_question_type"].items()]
    width = max(12, *(len(kind) + 2 for kind, _ in rows))
    lines.append(f"{'answer type':<{width}}{'count':>8}{'VQA acc':>10}{'exact':>9}")
    for kind, m in rows:
        lines.append(f"{kind:<{width}}{m['count']:>8}{100 * m['accuracy']:>9.2f}%{100 * m['exact_match']:>8.2f}%"
                     if m else kind)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
