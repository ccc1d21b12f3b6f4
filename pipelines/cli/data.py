"""``vqa-data``: write the synthetic shapes and audio-visual datasets, read VGGSound, AudioSet and VALOR, write QA
shards, and check shards against caches."""

import functools
import json
import logging
import sys

import click

from ..data.vqa import MAX_QUESTION_CHARS
from .common import cli_errors, parse_caches, parse_pairs, setup_logging


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
    """Data steps of stage 2: the synthetic shapes dataset, the VGGSound, AudioSet and VALOR readers,
    QA shards, cache checks.

    Example:

    \b
        vqa-data shapes data/shapes --images 2000
        vqa-data shards data/shapes data/qa
        vqa-data vggsound vggsound.csv --clips clips/ --out data/vggsound
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
@click.option("--first-id", type=click.IntRange(min=0), default=1, show_default=True,
              help="The first image id (another split in the same folder needs ids of its own, and another --seed).")
@click.option("--task", type=click.Choice(["vqa", "notes"]), default="vqa", show_default=True,
              help="vqa: the VQA v2 layout; notes: two text fields and the image, in the examples layout.")
@_fail_cleanly
def shapes(out, images, seed, size, questions_per_image, split, first_id, task):
    """Write the synthetic shapes dataset to OUT in the VQA v2 layout (or the notes task).

    Coloured shapes on a 3x3 grid; questions about colour, shape, presence, count, position and
    relations, 10 answers each. Prints the question-only baseline (answering from the question
    text alone, fitted on 80% of the images, scored on the rest). Write a val split beside the
    train split with another seed and other image ids.

    --task notes writes the same scenes with two text fields per example, a note ("The marked
    object is the triangle.") and a question ("What color is the marked object?"), in the examples
    layout (examples-SPLIT.jsonl, images/ID.jpg): the answer needs both the note and the image.

    Example:

    \b
        vqa-data shapes data/shapes --images 2000 --seed 0
        vqa-data shapes data/shapes --images 500 --split val --seed 1 --first-id 100001
        vqa-data shapes data/notes --task notes --images 2000
    """
    from ..data.shapes import held_out_baseline, write_notes, write_shapes

    if task == "notes":
        with click.progressbar(length=images, label="images", file=sys.stderr) as bar:
            summary = write_notes(out, images=images, seed=seed, size=size, split=split, first_id=first_id,
                                  progress=bar.update)
        click.echo(f"wrote {summary['images']} images, {summary['examples']} examples to {out} (notes task; "
                   f"embed {out}/images)")
        return

    with click.progressbar(length=images, label="images", file=sys.stderr) as bar:
        summary = write_shapes(out, images=images, seed=seed, size=size, split=split,
                               questions_per_image=questions_per_image, progress=bar.update, first_id=first_id)
    line = (f"wrote {summary['images']} images, {summary['questions']} questions to {out} "
            f"({', '.join(f'{k}: {v}' for k, v in summary['answer_types'].items())})")
    baseline = held_out_baseline(out, split, seed)
    if baseline is not None:
        line += f"; question-only baseline {100 * baseline:.1f}%"
    click.echo(line)


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--clips", type=click.IntRange(min=1), default=2000, show_default=True, help="Number of clips.")
@click.option("--seed", default=0, show_default=True, help="Seed: the same seed writes the same bytes.")
@click.option("--size", default=96, show_default=True, help="Frame side in pixels.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Each clip's chance to be in the val split (the rest is train).")
@_fail_cleanly
def avshapes(out, clips, seed, size, val_fraction):
    """Write the audio-visual shapes dataset to OUT in the examples layout.

    Each clip is a frame of 2 to 4 coloured shapes (OUT/frames/ID.png) and a 1 s sound
    (OUT/clips/ID.wav, 16 kHz): 1 to 4 beeps, low or high, in the voice of one shape of the frame
    (circle: whistle, square: buzz, triangle: sawtooth, diamond: chirp, cross: click). Seven
    questions per clip need the sound ("How many beeps are there?"), the frame ("What color is the
    circle?") or both ("What color is the shape that is making the sound?"); groups "needs" and
    "question_type" break the scores down. Prints the question-only baseline per kind of question.

    Example:

    \b
        vqa-data avshapes data/av --clips 2000 --seed 0
        embed data/av/frames --out cache/av-image --model vit_shapes_patch16_48
        vqa-data shards data/av data/av-qa --train-splits train --eval-splits val
    """
    from ..data.avshapes import write_avshapes

    with click.progressbar(length=clips, label="clips", file=sys.stderr) as bar:
        summary = write_avshapes(out, clips=clips, seed=seed, size=size, val_fraction=val_fraction,
                                 progress=bar.update)
    counts = ", ".join(f"{k}: {v}" for k, v in summary["examples"].items())
    line = f"wrote {summary['clips']} clips ({counts} examples) to {out}"
    if summary["baseline"]:
        line += "; question-only baseline " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary["baseline"].items())
    click.echo(line + f" (embed {out}/frames and {out}/clips)")


def _split_list(value):
    return [s.strip() for s in value.split(",") if s.strip()] if value else None


@cli.command()
@click.argument("vqa_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--train-splits", default=None, metavar="SPLIT[,SPLIT]",
              help="Splits that make the train side, with --eval-splits [every other split with annotations].")
@click.option("--eval-splits", default=None, metavar="SPLIT[,SPLIT]",
              help="Splits scored whole as the eval side, e.g. val (VQA v2's protocol) [none: pool and split].")
@click.option("--select-fraction", type=float, default=0.0, show_default=True,
              help="Hold out this share of the train side's images as the select side, where fuse-train picks "
                   "its best checkpoint before scoring the eval side once (0: pick on the eval side).")
@click.option("--splits", default=None, metavar="SPLIT[,SPLIT]",
              help="Splits of VQA_DIR to pool and split at random by --eval-fraction [all with annotations].")
@click.option("--eval-fraction", type=float, default=None,
              help="Share of the pooled splits that goes to eval (not with --eval-splits).  [default: 0.2]")
@click.option("--split-by", type=click.Choice(["image", "question"]), default="image", show_default=True,
              help="image: no image on both sides (examples: their image field, else their first vector field); "
                   "question: a random slice of questions (examples).")
@click.option("--seed", default=0, show_default=True)
@click.option("--shard-size", default=1000, show_default=True, help="Records per shard at most.")
@click.option("--images-root", type=click.Path(file_okay=False), default=None,
              help="The folder holding the image folders (train2014/, val2014/) [VQA_DIR].")
@click.option("--no-check-images", is_flag=True, help="Do not require the image files to exist.")
@click.option("--max-question-chars", type=click.IntRange(min=1), default=MAX_QUESTION_CHARS, show_default=True,
              help="Refuse a question longer than this (VQA v2 questions are under 300 characters).")
@click.option("--inline", "inline", multiple=True, metavar="FIELD=CACHE",
              help="Carry a vector field's values in the shards (raw .npy members, from the cache CACHE), for "
                   "nodes without the LMDB cache; fuse-train then needs no --cache for it. Repeat per field.")
@_fail_cleanly
def shards(vqa_dir, out, train_splits, eval_splits, select_fraction, splits, eval_fraction, split_by, seed,
           shard_size, images_root, no_check_images, max_question_chars, inline):
    """Make the train and eval sides of a dataset and write them as WebDataset shards to OUT.

    VQA_DIR is the official VQA v2 layout (or `vqa-data shapes` output), or a folder in the examples
    layout (examples-SPLIT.jsonl: any text fields and vector fields, each vector field with its own
    cache id; see the README's "The example contract"); the manifest lists the fields and the metric. By default all its splits with
    annotations are pooled and split 80/20 by image (the thesis). VQA v2's protocol is --train-splits
    train --eval-splits val --select-fraction 0.05: train on train2014, pick the checkpoint on a
    held-out slice of it, score all of val2014. OUT gets train-*.tar, eval-*.tar, select-*.tar and
    manifest.json. A record that cannot be used (an empty question or one over
    --max-question-chars, ten empty answers) stops it with its question id.

    Example:

    \b
        vqa-data shards data/shapes data/qa --split-by image --seed 0
        vqa-data shards VQA_DIR data/qa --train-splits train --eval-splits val --select-fraction 0.05 --images-root coco/
        vqa-data shards data/shapes data/qa-inline --inline image=runs/cache
    """
    from ..data.shards import write_qa_shards

    inline = parse_pairs(inline, "--inline", "image=runs/cache", form="FIELD=CACHE")
    manifest = write_qa_shards(vqa_dir, out, split_by=split_by, seed=seed, eval_fraction=eval_fraction,
                               shard_size=shard_size, splits=_split_list(splits),
                               train_splits=_split_list(train_splits), eval_splits=_split_list(eval_splits),
                               select_fraction=select_fraction, images_root=images_root,
                               check_images=not no_check_images, max_question_chars=max_question_chars,
                               inline=inline)
    parts, what = [], "questions" if manifest["layout"] == "vqa-v2" else "examples"
    for side in ("train", "select", "eval"):
        if side in manifest:
            m = manifest[side]
            parts.append(f"{side}: {m['count']} {what}, {m['images']} images, {len(m['shards'])} shards")
    fields = manifest["fields"]
    click.echo(f"{'; '.join(parts)} -> {out} (text fields: {', '.join(fields['texts']) or 'none'}; vector fields: "
               f"{', '.join(fields['vectors']) or 'none'}; metric: {manifest['metric']}"
               + (f"; inline: {', '.join(manifest['inline'])}" if manifest.get("inline") else "") + ")")


def _avset_options(fn):
    """The options every audio-visual set reader takes."""
    for decorator in reversed([
        click.argument("annotations", nargs=-1, required=True, type=click.Path(dir_okay=False)),
        click.option("--clips", required=True, type=click.Path(file_okay=False),
                     help="The folder of clips (fetched with your own tools)."),
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="The examples folder to write (examples-SPLIT.jsonl, dataset.json, clips.tsv, skipped.jsonl)."),
        click.option("--pattern", default=None, metavar="PATTERN",
                     help="An annotation's clip file under --clips: fields {id}, {start}, {end} (whole seconds), "
                          "{start_ms}, with format specs."),
        click.option("--cache", "caches", multiple=True, metavar="FIELD=CACHE",
                     help="A vector field's cache, once embedded: clips that failed there (CACHE.failures.jsonl) "
                          "or are not in it are left out and listed. Repeat per field."),
        click.option("--modalities", default="audio,video", show_default=True, metavar="audio,video",
                     help="The vector fields of each example, each keyed by the clip's id."),
        click.option("--strict", is_flag=True, help="Exit 1 if any annotation was left out (after listing them)."),
    ]):
        fn = decorator(fn)
    return fn


def _write_avset(fmt, annotations, clips, out, pattern, caches, modalities, strict, ontology=None):
    from ..data.avsets import write_avset

    summary = write_avset(fmt, list(annotations), clips, out, pattern=pattern, ontology=ontology,
                          caches=parse_pairs(caches, "--cache", "audio=cache/audio", form="FIELD=CACHE"),
                          modalities=_split_list(modalities) or [], strict=strict)
    counts = ", ".join(f"{k}: {v}" for k, v in summary["examples"].items())
    line = f"{fmt}: {sum(summary['examples'].values())} examples ({counts}) of {summary['annotations']} annotations"
    if summary["labels"]:
        line += f", {summary['labels']} labels"
    if summary["skipped_total"]:
        kinds = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items())
        line += f"; {summary['skipped_total']} left out ({kinds}), listed in {out}/skipped.jsonl"
    click.echo(line + f" -> {out} (embed {out}/clips.tsv)")


@cli.command()
@_avset_options
@_fail_cleanly
def vggsound(annotations, clips, out, pattern, caches, modalities, strict):
    """VGGSound: vggsound.csv (YouTube ID, start seconds, label, split; no header) and a folder of clips
    -> the examples layout in OUT, one example per clip: "What is making the sound?" -> the label, the
    clip's audio and frames as vector fields (ids: the clip files' stems, as embed keys them). Metric
    "label": exact match, and top-1 over the closed label set from the model's likelihoods.

    Clips are CLIPS/{id}_{start:06d}.mp4 unless --pattern says otherwise. Clips not in the folder (and,
    with --cache, clips that failed to embed) are left out, counted and listed in OUT/skipped.jsonl.

    Example:

    \b
        vqa-data vggsound vggsound.csv --clips clips/ --out data/vggsound
        embed data/vggsound/clips.tsv --modality audio --out cache/vgg-audio
        vqa-data vggsound vggsound.csv --clips clips/ --out data/vggsound --cache audio=cache/vgg-audio
    """
    _write_avset("vggsound", annotations, clips, out, pattern, caches, modalities, strict)


@cli.command()
@_avset_options
@click.option("--ontology", required=True, type=click.Path(dir_okay=False),
              help="AudioSet's ontology.json (label ids -> names).")
@_fail_cleanly
def audioset(annotations, clips, out, pattern, caches, modalities, strict, ontology):
    """AudioSet: segment CSVs (eval_segments.csv, balanced_train_segments.csv, ...; '#' header lines, then
    YTID, start_seconds, end_seconds, "label ids") with ontology.json -> the examples layout in OUT:
    "Which sounds are in the clip?" -> the label names in the ontology's order joined by "; ". The
    split is the file name less "_segments". Metric "multilabel": exact-set match, micro/macro F1,
    and mAP from the labels' likelihoods.

    Example:

    \b
        vqa-data audioset balanced_train_segments.csv eval_segments.csv --ontology ontology.json --clips clips/ --out data/audioset
    """
    _write_avset("audioset", annotations, clips, out, pattern, caches, modalities, strict, ontology=ontology)


@cli.command()
@_avset_options
@_fail_cleanly
def valor(annotations, clips, out, pattern, caches, modalities, strict):
    """VALOR: desc_SPLIT.json files (a JSON list of {"video_id", "desc"}; several captions per clip
    allowed) -> the examples layout in OUT: the clip's captions are the references, the first the
    target. Clips are CLIPS/{id}.mp4 (id: the video_id) unless --pattern says otherwise. Metric
    "caption": BLEU-4 and CIDEr-D.

    Example:

    \b
        vqa-data valor desc_train.json desc_test.json --clips clips/ --out data/valor
    """
    _write_avset("valor", annotations, clips, out, pattern, caches, modalities, strict)


@cli.command()
@click.argument("shard_dir", type=click.Path(file_okay=False))
@click.option("--cache", "caches", multiple=True, required=True, metavar="FIELD=PATH",
              help="A vector field's cache; repeat for several fields.")
@click.option("--expect", default=None, metavar="JSON",
              help='Expected metadata per modality, e.g. \'{"image": {"shape": [196, 768]}}\'.')
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_fail_cleanly
def check(shard_dir, caches, expect, as_json):
    """Check that the caches hold an embedding for every record of SHARD_DIR (every side).

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
        counts = [f"{report[side]['records']} {side}" for side in ("train", "select", "eval") if side in report]
        click.echo(f"ok: every id of {', '.join(counts[:-1])} and {counts[-1]} records is in "
                   f"{', '.join(f'{k}={v}' for k, v in caches.items())}")


def main():
    cli()


if __name__ == "__main__":
    main()
