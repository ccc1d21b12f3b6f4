"""QA records as WebDataset tar shards.

One sample per image: ``__key__`` = the sample's number in its shard side, ``json`` = the list of
that image's records (:meth:`QARecord.to_dict <pipelines.data.vqa.QARecord.to_dict>`), in dataset order;
the stream unlists them and shuffles records, not images. Why not one sample per question: webdataset
reads a tar member and decodes its JSON at a fixed cost per sample (~30 us on the 2-core dev VM,
more than the record's tokenizing and batching), and a VQA image has about 5 questions. Packing
is a storage detail: a run of records with one image id becomes one sample, cut where a shard ends
(so the record counts of ``shard_size`` hold), and records of an image that are not consecutive
simply make more samples. Shards are written through
:class:`store.AtomicShardWriter` (``NAME.tmp``, renamed when complete), so a shard appears under its
name only once whole. A shard folder holds ``train-000000.tar ...``, ``eval-000000.tar ...`` and,
written last, ``manifest.json`` (how the shards were made, and the shard names and counts): a folder
without a manifest is an unfinished run.
"""

import json
import math
import os
from pathlib import Path

from store import AtomicShardWriter
from store.format import now_iso

from ..errors import DatasetExistsError, PipelineError
from ..files import write_atomic
from .splits import split_records
from .tokens import build_word_tokenizer
from .vqa import MAX_QUESTION_CHARS, QARecord, read_vqa

MANIFEST = "manifest.json"
WORD_TOKENIZER = "tokenizer"
MANIFEST_FORMAT = "where-to-fuse/qa-shards"
MANIFEST_VERSION = 2  # 1: one sample per question (read no more: rebuild with `vqa-data shards`)
SIDES = ("train", "eval")


def record_dict(record) -> dict:
    return record.to_dict() if isinstance(record, QARecord) else dict(record)


def write_shards(records, pattern, shard_size: int = 1000, min_shards: int = 1) -> list:
    """Write records to shards named by ``pattern`` (e.g. ``out/train-%06d.tar``), one sample per run
    of records with the same image id (see the module docstring).

    Args:
        records: :class:`QARecord` s or record dicts.
        pattern: shard path pattern with one ``%d``-style field.
        shard_size: at most this many records per shard.
        min_shards: make at least this many shards when there are enough records (so that nodes
            and DataLoader workers, which split by shard, each get some).

    Returns:
        The shard paths, in order.
    """
    records = list(records)
    if not records:
        raise PipelineError(f"{pattern}: no records to write")
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size}: must be at least 1")
    per_shard = max(1, min(shard_size, math.ceil(len(records) / max(min_shards, 1))))
    Path(str(pattern) % 0).parent.mkdir(parents=True, exist_ok=True)
    # mtime 0: no PAX header per member; maxcount: never, shards are cut here by records
    with AtomicShardWriter(str(pattern), maxcount=len(records) + 1) as sink:
        group, in_shard, samples = [], 0, 0

        def write_group():
            nonlocal group, in_shard, samples
            sink.write({"__key__": f"{samples:09d}", "json": json.dumps(group).encode("utf-8")})
            in_shard, samples, group = in_shard + len(group), samples + 1, []

        for i, r in enumerate(records):
            d = record_dict(r)
            if group and d.get("image_id") != group[0].get("image_id"):
                write_group()
            group.append(d)
            if in_shard + len(group) == per_shard:
                write_group()
                if i + 1 < len(records):  # the full shard is renamed into place now
                    sink.next_shard()
                    in_shard = 0
        if group:
            write_group()
    return list(sink.shards)


def _refuse_existing(out: Path) -> None:
    if (out / MANIFEST).exists() or any(out.glob("*.tar")) or any(out.glob("*.tar.tmp")):
        raise DatasetExistsError(f"{out} already holds shards: write to another folder or delete it first")


def write_qa_shards(vqa_dir, out, split_by: str = "image", seed: int = 0, eval_fraction: float = 0.2,
                    shard_size: int = 1000, min_shards: int = 8, splits=None,
                    check_images: bool = True, max_question_chars: int = MAX_QUESTION_CHARS) -> dict:
    """Read a VQA v2 folder, split it 80/20 (by default) and write train and eval shards.

    Args:
        vqa_dir: folder in the VQA v2 layout (the official data or :mod:`pipelines.data.shapes`).
        out: output folder; must not hold shards already.
        split_by, seed, eval_fraction: see :func:`pipelines.data.splits.split_records`.
        shard_size, min_shards: see :func:`write_shards`.
        splits: which splits of ``vqa_dir`` to pool (default: all found).
        check_images: require every image file to exist.
        max_question_chars: refuse a question longer than this (see :func:`pipelines.data.vqa.read_split`).

    Returns:
        The manifest (also written to ``out/manifest.json``).
    """
    out = Path(out)
    _refuse_existing(out)
    records = read_vqa(vqa_dir, splits=splits, check_images=check_images, max_question_chars=max_question_chars)
    train, evals = split_records(records, by=split_by, eval_fraction=eval_fraction, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "created": now_iso(),
        "source": str(Path(vqa_dir).resolve()), "splits": sorted({r.split for r in records}),
        "split_by": split_by, "seed": seed, "eval_fraction": eval_fraction, "shard_size": shard_size,
        "images": len({r.image_id for r in records}),
    }
    for side, recs in (("train", train), ("eval", evals)):
        paths = write_shards(recs, out / f"{side}-%06d.tar", shard_size=shard_size, min_shards=min_shards)
        manifest[side] = {"count": len(recs), "images": len({r.image_id for r in recs}),
                          "shards": [Path(p).name for p in paths]}
    # A word-level tokenizer of the training side (questions and answers), for small vocabularies
    # such as the shapes data: `fuse-train --tokenizer words` reads it from here.
    manifest["word_vocab_size"] = build_word_tokenizer(
        [r.question for r in train] + [a for r in train for a in r.answers], out / WORD_TOKENIZER)
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(out) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{path}: no such file (not a shard folder, or `vqa-data shards` did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise PipelineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise PipelineError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise PipelineError(f"{path}: shards of format version {manifest.get('version')}, this version reads "
                            f"{MANIFEST_VERSION}: write them again with `vqa-data shards`")
    return manifest


def shard_paths(out, side: str) -> list:
    """The shard paths of one side (``train`` or ``eval``) of a shard folder, from its manifest."""
    if side not in SIDES:
        raise ValueError(f"side {side!r}: choose one of {', '.join(SIDES)}")
    manifest = read_manifest(out)
    paths = [str(Path(out) / name) for name in manifest[side]["shards"]]
    for p in paths:
        if not os.path.isfile(p):
            raise PipelineError(f"{p}: shard listed in {Path(out) / MANIFEST} is missing")
    return paths
