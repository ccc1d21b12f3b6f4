"""Examples as WebDataset tar shards.

The source is a VQA v2 folder (:mod:`pipelines.data.vqa`, each question an example with the
``question`` text and the ``image`` vector) or a folder in the examples layout
(:mod:`pipelines.data.example`, any text and vector fields). One sample per image: ``__key__`` = the
sample's number in its shard side, ``json`` = the list of that image's examples
(:meth:`Example.to_dict <pipelines.data.example.Example.to_dict>`; "image": the first vector field's
id), in dataset order; the stream unlists them and shuffles examples, not images. Why not one sample per question: webdataset
reads a tar member and decodes its JSON at a fixed cost per sample (~30 us on the 2-core dev VM,
more than the record's tokenizing and batching), and a VQA image has about 5 questions. Packing
is a storage detail: a run of records with one image id becomes one sample, cut where a shard is
full (so the record counts of ``shard_size`` hold), and records of an image that are not consecutive
simply make more samples. Shards are written through
:class:`store.AtomicShardWriter` (``NAME.tmp``, renamed when complete), so a shard appears under its
name only once whole. A shard folder holds ``train-000000.tar ...``, ``eval-000000.tar ...``,
``select-000000.tar ...`` if asked and, written last, ``manifest.json`` (how the shards were made,
the fields the examples hold, the metric, and the shard names and counts): a folder without a
manifest is an unfinished run.

The sides: ``train`` (trained on), ``eval`` (scored) and, optionally, ``select`` (a held-out slice
of the train side's images, ``select_fraction``, on which ``fuse-train`` picks its best checkpoint
before scoring ``eval`` once). Either the VQA splits are pooled and split at random (the thesis:
80/20 by image, the default), or named splits make each side whole (VQA v2's protocol:
``train_splits=["train"], eval_splits=["val"]``).
"""

import json
import os
from pathlib import Path

from store import AtomicShardWriter
from store.format import now_iso

from ..errors import DatasetExistsError, PipelineError, VQAFormatError
from ..files import read_format_json, write_atomic
from .example import (
    Example,
    example_splits,
    fields_of,
    group_key,
    is_examples_dir,
    read_dataset_info,
    read_examples,
)
from .inline import manifest_entry, sample_members
from .remote import check_location, is_url, join, read_bytes
from .splits import split_records
from .tokens import build_word_tokenizer
from .vqa import MAX_QUESTION_CHARS, QARecord, discover_splits, read_vqa

MANIFEST = "manifest.json"
WORD_TOKENIZER = "tokenizer"
MANIFEST_FORMAT = "where-to-fuse/qa-shards"
MANIFEST_VERSION = 3  # 1: one sample per question; 2: VQA records (read no more: rebuild with `vqa-data shards`)
SIDES = ("train", "select", "eval")  # select: only in folders written with a select fraction
DEFAULT_EVAL_FRACTION = 0.2


def record_dict(record) -> dict:
    """An example's JSON form, from an :class:`Example`, a :class:`QARecord` or an example dict."""
    if isinstance(record, QARecord):
        record = record.to_example()
    return record.to_dict() if isinstance(record, Example) else dict(record)


def write_shards(records, pattern, shard_size: int = 1000, min_shards: int = 1, inline: dict | None = None) -> list:
    """Write examples to shards named by ``pattern`` (e.g. ``out/train-%06d.tar``), one sample per run
    of examples with the same image id (:func:`~pipelines.data.example.group_key`; see the module
    docstring).

    A shard is filled up to ``shard_size`` records. To give a small side ``min_shards`` shards, shard
    k also ends where an image's run of records ends once the shards so far hold k/``min_shards`` of
    the records; only a full shard cuts an image's run, so a side of one image is one shard (it used
    to be cut into ``min_shards`` shards of a record or two).

    Args:
        records: :class:`Example` s, their dicts or :class:`QARecord` s.
        pattern: shard path pattern with one ``%d``-style field.
        shard_size: at most this many records per shard.
        min_shards: make at least this many shards when there are enough images (so that nodes
            and DataLoader workers, which split by shard, each get some).
        inline: vector field -> :class:`store.CacheReader` whose values each sample carries as
            ``FIELD.npy`` (:mod:`pipelines.data.inline`); every id must be in its cache.

    Returns:
        The shard paths, in order.
    """
    records = list(records)
    if not records:
        raise PipelineError(f"{pattern}: no records to write")
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size}: must be at least 1")
    share = len(records) / max(min_shards, 1)
    Path(str(pattern) % 0).parent.mkdir(parents=True, exist_ok=True)
    # mtime 0: no PAX header per member; maxcount: never, shards are cut here by records
    with AtomicShardWriter(str(pattern), maxcount=len(records) + 1) as sink:
        group, in_shard, samples, written, shards = [], 0, 0, 0, 1

        def write_group():
            nonlocal group, in_shard, samples, written
            sink.write({"__key__": f"{samples:09d}", "json": json.dumps(group).encode("utf-8"),
                        **sample_members(group, inline or {})})
            in_shard, samples, written, group = in_shard + len(group), samples + 1, written + len(group), []

        for i, r in enumerate(records):
            d = record_dict(r)
            if group and group_key(d) != group_key(group[0]):
                write_group()
                if written >= shards * share:  # this shard's share of min_shards, between two images
                    sink.next_shard()
                    in_shard, shards = 0, shards + 1
            group.append(d)
            if in_shard + len(group) == shard_size:  # full: cut even inside an image's run
                write_group()
                if i + 1 < len(records):  # the full shard is renamed into place now
                    sink.next_shard()
                    in_shard, shards = 0, shards + 1
        if group:
            write_group()
    return list(sink.shards)


def _refuse_existing(out: Path) -> None:
    if (out / MANIFEST).exists() or any(out.glob("*.tar")) or any(out.glob("*.tar.tmp")):
        raise DatasetExistsError(f"{out} already holds shards: write to another folder or delete it first")


def _splits_of(source, annotated: bool = False) -> list:
    return example_splits(source) if is_examples_dir(source) else discover_splits(source, annotated=annotated)


def side_splits(vqa_dir, splits=None, train_splits=None, eval_splits=None, eval_fraction=None) -> dict:
    """How the splits of ``vqa_dir`` (VQA v2 or examples layout) make the sides, checked before
    anything is read.

    Returns:
        ``{"train_splits", "eval_splits", "eval_fraction", "splits"}``: named sides (``eval_fraction``
        None), or pooled ``splits`` (None: every split with annotations) split at ``eval_fraction``.

    Raises:
        ValueError: flags that do not go together (exit 2), naming them.
        VQAFormatError: no split is left for the train side.
    """
    if eval_splits:
        if splits:
            raise ValueError(f"--splits {','.join(splits)}: --splits pools splits to split them at random; with "
                             "--eval-splits, name the train side's splits with --train-splits")
        if eval_fraction is not None:
            raise ValueError(f"--eval-fraction {eval_fraction}: the eval side is --eval-splits "
                             f"{','.join(eval_splits)} whole; give one or the other")
        if train_splits is None:
            train_splits = [s for s in _splits_of(vqa_dir, annotated=True) if s not in eval_splits]
            if not train_splits:
                raise VQAFormatError(f"{vqa_dir}: no split with annotations besides --eval-splits "
                                     f"{','.join(eval_splits)} for the train side")
        both = [s for s in train_splits if s in eval_splits]
        if both:
            raise ValueError(f"--train-splits and --eval-splits both name {', '.join(both)}: a split goes to one side")
        return {"train_splits": list(train_splits), "eval_splits": list(eval_splits), "eval_fraction": None,
                "splits": [*train_splits, *eval_splits]}
    if train_splits:
        raise ValueError(f"--train-splits {','.join(train_splits)}: give the eval side's splits with --eval-splits "
                         "too (or pool splits and split them at random with --splits)")
    eval_fraction = DEFAULT_EVAL_FRACTION if eval_fraction is None else eval_fraction
    if not 0 < eval_fraction < 1:  # before reading the data (split_records says so too)
        raise ValueError(f"--eval-fraction {eval_fraction}: must be between 0 and 1")
    return {"train_splits": None, "eval_splits": None, "splits": list(splits) if splits else None,
            "eval_fraction": eval_fraction}


def read_source(source, splits=None, check_images: bool = True, max_question_chars: int = MAX_QUESTION_CHARS,
                images_root=None) -> tuple:
    """``(examples, {"layout", "metric"})`` of a VQA v2 folder or an examples folder (see
    :func:`write_qa_shards`)."""
    if is_examples_dir(source):
        info = read_dataset_info(source)
        closed = {"labels": info["labels"]} if "labels" in info else {}  # a closed label set (label, multilabel)
        return read_examples(source, splits), {"layout": "examples", "metric": info["metric"], **closed}
    records = read_vqa(source, splits=splits, check_images=check_images, max_question_chars=max_question_chars,
                       images_root=images_root)
    return [r.to_example() for r in records], {"layout": "vqa-v2", "metric": "vqa"}


def write_qa_shards(vqa_dir, out, split_by: str = "image", seed: int = 0, eval_fraction: float | None = None,
                    shard_size: int = 1000, min_shards: int = 8, splits=None,
                    check_images: bool = True, max_question_chars: int = MAX_QUESTION_CHARS,
                    train_splits=None, eval_splits=None, select_fraction: float = 0.0,
                    images_root=None, inline: dict | None = None) -> dict:
    """Read a dataset, make the train and eval sides (and a select side if asked) and write them
    as shards.

    Args:
        vqa_dir: a folder in the VQA v2 layout (the official data or :mod:`pipelines.data.shapes`), or
            in the examples layout (:mod:`pipelines.data.example`; ``check_images``,
            ``max_question_chars`` and ``images_root`` do not apply).
        out: output folder; must not hold shards already.
        split_by, seed: see :func:`pipelines.data.splits.split_records` (for both random splits).
        eval_fraction: the share of the pooled splits that goes to eval (default 0.2); not with
            ``eval_splits``.
        shard_size, min_shards: see :func:`write_shards`.
        splits: which splits of ``vqa_dir`` to pool (default: all found with annotations).
        check_images: require every image file to exist.
        max_question_chars: refuse a question longer than this (see :func:`pipelines.data.vqa.read_split`).
        train_splits, eval_splits: the splits that make the train side and, whole, the eval side
            (VQA v2's protocol: ``["train"]``, ``["val"]``); ``train_splits`` defaults to every other
            split with annotations.
        select_fraction: the share of the train side's images held out as the select side (0: none).
        images_root: the folder holding the image folders ``{split}2014/`` (default ``vqa_dir``).
        inline: vector field -> cache folder whose values the samples carry (``--inline image=CACHE``,
            :mod:`pipelines.data.inline`); each is checked to hold every id before anything is written.

    Returns:
        The manifest (also written to ``out/manifest.json``).

    Raises:
        ValueError: settings that do not go together, or a fraction that leaves a side empty (exit 2).
        VQAFormatError: the VQA files are missing or malformed.
        DatasetExistsError: ``out`` holds shards already.
        MissingEmbeddingsError: an ``inline`` cache lacks ids of the data (nothing is written).
    """
    out = Path(out)
    plan = side_splits(vqa_dir, splits, train_splits, eval_splits, eval_fraction)
    if select_fraction and not 0 < select_fraction < 1:
        raise ValueError(f"--select-fraction {select_fraction}: must be between 0 and 1 (0: no select side)")
    _refuse_existing(out)
    records, info = read_source(vqa_dir, plan["splits"], check_images, max_question_chars, images_root)
    fields = fields_of(records)
    readers = open_inline(inline or {}, fields, records)
    if plan["eval_splits"]:
        sides = {"train": [r for r in records if r.split in plan["train_splits"]],
                 "eval": [r for r in records if r.split in plan["eval_splits"]]}
    else:
        train, evals = split_records(records, by=split_by, eval_fraction=plan["eval_fraction"], seed=seed)
        sides = {"train": train, "eval": evals}
    if select_fraction:
        # held out of the train side by image (--split-by), so the selection scores unseen images
        sides["train"], sides["select"] = split_records(sides["train"], by=split_by, eval_fraction=select_fraction,
                                                        seed=seed, flag="--select-fraction")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "created": now_iso(),
        "source": str(Path(vqa_dir).resolve()),
        "images_root": str(Path(images_root).resolve()) if images_root is not None else None,
        "splits": sorted({r.split for r in records}),
        "train_splits": plan["train_splits"], "eval_splits": plan["eval_splits"],
        "split_by": split_by, "seed": seed, "eval_fraction": plan["eval_fraction"],
        "select_fraction": select_fraction or None, "shard_size": shard_size,
        "layout": info["layout"], "fields": fields, "metric": info["metric"],
        "images": len({group_key(r) for r in records}),
    }
    if "labels" in info:  # the closed label set that fuse-train and fuse-eval rank (pipelines.metrics.labels)
        manifest["labels"] = info["labels"]
    if readers:
        manifest["inline"] = manifest_entry(readers)
    for side in SIDES:
        if side not in sides:
            continue
        recs = sides[side]
        paths = write_shards(recs, out / f"{side}-%06d.tar", shard_size=shard_size, min_shards=min_shards,
                             inline=readers)
        manifest[side] = {"count": len(recs), "images": len({group_key(r) for r in recs}),
                          "shards": [Path(p).name for p in paths]}
    # A word-level tokenizer of the training side (texts, targets and references), for small
    # vocabularies such as the shapes data: `fuse-train --tokenizer words` reads it from here.
    train = sides["train"]
    manifest["word_vocab_size"] = build_word_tokenizer(
        [t for r in train for t in r.texts.values()] + [r.target for r in train] + [a for r in train for a in r.references],
        out / WORD_TOKENIZER)
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def open_inline(inline: dict, fields: dict, records: list) -> dict:
    """The caches of ``--inline FIELD=CACHE``, each checked to be a vector field of the data holding
    every id the records name (before any shard is written)."""
    from store import CacheReader

    from .preflight import preflight

    for name in inline:
        if name not in fields["vectors"]:
            raise ValueError(f"--inline {name}=CACHE: the data has no vector field {name!r} (vector fields: "
                             f"{', '.join(fields['vectors']) or 'none'})")
    readers = {name: CacheReader(path) for name, path in inline.items()}
    preflight([record_dict(r) for r in records], readers)  # MissingEmbeddingsError naming the cache and ids
    return readers


def read_manifest(out) -> dict:
    """The manifest of a shard folder, a local path or a URL (:mod:`pipelines.data.remote`).

    Raises:
        PipelineError: no manifest, not one, or of another version.
    """
    path = join(out, MANIFEST)
    check_location(path)
    if not is_url(path) and not Path(path).is_file():
        raise PipelineError(f"{path}: no such file (not a shard folder, or `vqa-data shards` did not finish)")
    raw = read_bytes(path)
    manifest = read_format_json(path, MANIFEST_FORMAT, "manifest", PipelineError, raw=raw)
    if manifest.get("version") != MANIFEST_VERSION:
        raise PipelineError(f"{path}: shards of format version {manifest.get('version')}, this version reads "
                            f"{MANIFEST_VERSION}: write them again with `vqa-data shards`")
    return manifest


def selection_side(out) -> str:
    """The side on which ``fuse-train`` picks its best checkpoint: ``select`` where the folder has one,
    else ``eval`` (the thesis' protocol, and folders written before the select side existed)."""
    return "select" if "select" in read_manifest(out) else "eval"


def shard_paths(out, side: str) -> list:
    """The shard paths of one side (``train``, ``select`` or ``eval``) of a shard folder, from its manifest."""
    if side not in SIDES:
        raise ValueError(f"side {side!r}: choose one of {', '.join(SIDES)}")
    manifest = read_manifest(out)
    if side not in manifest:
        raise PipelineError(f"{join(out, MANIFEST)}: no {side} side (`vqa-data shards` writes one with "
                            "--select-fraction)")
    paths = [join(out, name) for name in manifest[side]["shards"]]
    for p in paths:
        if not is_url(p) and not os.path.isfile(p):
            raise PipelineError(f"{p}: shard listed in {Path(out) / MANIFEST} is missing")
    return paths
