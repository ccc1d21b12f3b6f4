"""``fuse-eval``: score a checkpoint on a side of the shards or on a VQA split (writing the evaluation
server's results file if asked), or answer one question about one image (see :mod:`pipelines.train.evaluate`)."""

import json
import os

import click

from .common import cli_errors, parse_caches, parse_pairs, setup_logging


@click.command(context_settings={"show_default": True})
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--shards", type=click.Path(exists=True, file_okay=False), help="Folder written by `vqa-data shards`.")
@click.option("--cache", "caches", multiple=True, metavar="MODALITY=PATH",
              help="Embedding caches (default: the ones the run trained with).")
@click.option("--side", type=click.Choice(["eval", "select", "train"]), default=None,
              help="Which side of the shards.  [default: eval]")
@click.option("--split", default=None, metavar="SPLIT",
              help="Score a VQA split instead, read from its questions file (val, test-dev, test); one without "
                   "annotations is answered, not scored.")
@click.option("--vqa-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="The folder of --split's files [the one the shards were made from].")
@click.option("--results-file", type=click.Path(dir_okay=False), default=None,
              help='Write every answer as the VQA evaluation server wants it: [{"question_id": ..., "answer": ...}].')
@click.option("--batch-size", type=int, default=128)
@click.option("--limit", type=click.IntRange(min=0), help="Score the first N questions (0: all).")
@click.option("--allow-missing", is_flag=True,
              help="Drop questions whose id a cache lacks, and count them (on if the run trained so).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads [the run's: the cores left after the stream's workers].")
@click.option("--progress/--no-progress", default=None, help="A progress bar on stderr [on a terminal].")
@click.option("--field", "fields", multiple=True, metavar="FIELD=TEXT",
              help="Answer one example: a text field's text (repeat for each text field the model fuses).")
@click.option("--file", "files", multiple=True, metavar="FIELD=PATH",
              help="Answer one example: a vector field's file, embedded as its cache was (an image).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Short for --file image=PATH.")
@click.option("--question", help="Short for --field question=TEXT.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def main(checkpoint, shards, caches, side, split, vqa_dir, results_file, batch_size, limit, allow_missing, threads,
         progress, fields, files, image, question, as_json):
    """Score a fuse-train checkpoint with its data's metric (the official VQA accuracy for VQA), or
    answer one example given by hand.

    CHECKPOINT is a run directory (its best checkpoint is used) or a checkpoint folder. Scores the
    eval side of the run's shards, another side (--side), or a VQA split (--split val: all of
    val2014, as VQA v2 papers report); --results-file writes the answers for the evaluation
    server, also of test-dev and test, which have no annotations.

    Example:

    \b
        fuse-eval runs/demo --shards runs/qa
        fuse-eval runs/demo --split val --results-file runs/demo/val_results.json
        fuse-eval runs/demo --split test-dev --results-file runs/demo/test-dev_results.json
        fuse-eval runs/demo --image shapes/train2014/COCO_train2014_000000000001.jpg --question "What color is the circle?"
        fuse-eval runs/notes --file image=notes/images/7.jpg --field note="The marked object is the circle." \\
            --field question="What color is the marked object?"
    """
    setup_logging()
    texts = parse_pairs(fields, "--field", 'question="What color is the circle?"', empty_ok=True, form="FIELD=TEXT")
    paths = parse_pairs(files, "--file", "image=photo.jpg")
    for flag, table, name, value in (("--question", texts, "question", question), ("--image", paths, "image", image)):
        if value is not None:
            if name in table:
                raise click.UsageError(f"{flag} and --{'field' if table is texts else 'file'} {name}=...: give one")
            table[name] = value
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise click.UsageError(f"--file {name}={path}: no such file")
    from transformers.utils import logging as hf_logging

    from ..train.checkpoint import load_checkpoint
    from ..train.evaluate import ScoreConfig, answer_one, score

    hf_logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar: noise before the eval's own

    caches = parse_caches(caches) if caches else None
    with cli_errors():
        config = ScoreConfig(shards=shards, caches=caches, side=side, split=split, vqa_dir=vqa_dir,
                             batch_size=batch_size, limit=limit, allow_missing=allow_missing,
                             results_file=results_file, threads=threads, progress=progress)
        model, run, tokenizer, ckpt = load_checkpoint(checkpoint)
        if texts or paths:
            answer = answer_one(model, run, tokenizer, texts, paths)
            click.echo(json.dumps({**texts, **paths, "answer": answer}) if as_json else answer)
            return
        summary = score(model, run, tokenizer, config)
    summary["checkpoint"] = str(ckpt)
    if results_file:
        click.echo(f"{summary['answered']} answers ({summary['scored']}) -> {results_file}", err=True)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if not summary["count"]:
        click.echo(f"{ckpt}: {summary['answered']} questions answered ({summary['scored']}: no annotations, "
                   "not scored)")
        return
    click.echo(format_summary(summary, f"{ckpt}: {summary['count']} questions ({summary['scored']})"))


def format_summary(summary: dict, title: str) -> str:
    """A table of the metric's accuracy and exact match, overall, by answer type and by question type."""
    lines = [title]
    rows = [("all", summary), *summary["by_answer_type"].items()]
    if summary["by_question_type"]:
        rows += [("", None), ("question type", None), *summary["by_question_type"].items()]
    for name, values in summary.get("by_group", {}).items():
        rows += [("", None), (name, None), *values.items()]
    width = max(12, *(len(kind) + 2 for kind, _ in rows))
    metric = summary.get("metric", "vqa")
    if metric == "caption":  # CIDEr-D and BLEU-4 times 100, as papers report them
        lines.append(f"{'group':<{width}}{'count':>8}{'CIDEr-D':>10}{'BLEU-4':>9}{'exact':>9}")
        for kind, m in rows:
            lines.append(f"{kind:<{width}}{m['count']:>8}{100 * m['cider']:>10.1f}{100 * m['bleu4']:>9.1f}"
                         f"{100 * m['exact_match']:>8.2f}%" if m else kind)
        return "\n".join(lines)
    if metric == "label":  # top-1 from the labels' likelihoods, exact match of the generated text
        lines.append(f"{'group':<{width}}{'count':>8}{'top-1':>10}{'exact':>9}")
        for kind, m in rows:
            lines.append(f"{kind:<{width}}{m['count']:>8}{100 * m['accuracy']:>9.2f}%{100 * m['exact_match']:>8.2f}%"
                         if m else kind)
        return "\n".join(lines)
    if metric == "multilabel":  # mAP from the likelihoods; F1 and exact set of the generated label sets
        lines.append(f"{'group':<{width}}{'count':>8}{'mAP':>9}{'micro F1':>10}{'macro F1':>10}{'exact set':>11}")
        for kind, m in rows:
            lines.append(f"{kind:<{width}}{m['count']:>8}{100 * m['map']:>8.2f}%{100 * m['micro_f1']:>9.2f}%"
                         f"{100 * m['macro_f1']:>9.2f}%{100 * m['exact_match']:>10.2f}%" if m else kind)
        return "\n".join(lines)
    acc = "VQA acc" if metric == "vqa" else "accuracy"
    lines.append(f"{'answer type':<{width}}{'count':>8}{acc:>10}{'exact':>9}")
    for kind, m in rows:
        lines.append(f"{kind:<{width}}{m['count']:>8}{100 * m['accuracy']:>9.2f}%{100 * m['exact_match']:>8.2f}%"
                     if m else kind)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
