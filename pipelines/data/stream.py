"""The training and eval streams: QA shards joined with embedding caches, tokenized and batched.

Training (:func:`train_loader`) runs a ``wds.DataPipeline`` (:func:`train_pipeline`) in the
DataLoader workers::

    shard list (shuffled per epoch; or resampled) -> split by node -> split by DataLoader worker
    -> tar members (one per image; shards are local paths or URLs: :mod:`pipelines.data.remote`)
    -> JSON decode (nothing else: no pickle) -> the image's records [with their inline values,
    raw .npy] -> unlisted -> shuffle buffer of records (seeded per epoch, rank and worker) -> [drop
    records with missing ids, if allowed] -> batch: tokenize, pad [, stack inline values]

and attaches each vector modality's cache values by id in the loading process, one copy from the
cache's memory map into the batch (why there and not in the workers: :mod:`pipelines.data.batch`);
a field whose values the shards carry (``--cache FIELD=inline``: :mod:`pipelines.data.inline`)
comes stacked from the workers instead.
Every stage is a module-level function or class, so the pipeline pickles into spawned workers; a
:class:`store.CacheReader` travels as its path and opens read-only, lazily, in each process.

Every record is read exactly once per epoch across nodes and workers when the shards are not
resampled: shards, not records, are dealt out (shard i to node i mod N, then to worker j mod W
within the node), so shards should outnumber nodes x workers (``vqa-data shards`` makes at least
8); a worker with no shard yields nothing, and uneven shards give ranks different numbers of
batches, which a DDP loop must allow for. For DDP training prefer ``resample=True``: an endless
stream, each worker drawing shards with replacement, and count steps.

Eval (:func:`eval_loader`) reads its records once, in shard order, into a list; rank r of W takes
records r, r+W, r+2W, ... (ranks differ by at most one record, none is read twice, and sums such as
:meth:`pipelines.metrics.vqa.VQAScore.state` combine exactly), and a map-style ``DataLoader`` keeps that
order whatever the number of workers.

A batch is a dict (B examples, :mod:`pipelines.data.example`):

================== ============================ ==============================================
key                type                         what
================== ============================ ==============================================
``tokens``         dict name -> (ids, mask)     each fused text field's tokens, int64 (B, L),
                                                right padded with pad id; mask 1 for tokens
``labels``         int64 tensor (B, La)         target tokens (with EOS), -100 padding
``vectors``        dict name -> tensor (B, ...) each vector field's cache values, e.g.
                                                (B, 196, 768), in the cache's dtype (float16,
                                                bfloat16, float32)
``ids``            dict name -> list of B str   each vector field's ids (its cache keys)
``id``             list of B int or str         the examples' ids (VQA: question ids)
``texts``          dict name -> list of B str   each fused text field, cut to
                                                :func:`pipelines.data.tokens.char_limit`
                                                characters (2,048 for 128 tokens)
``target``         list of B str                the target (the labels' text), cut likewise
``references``     list of B lists of str       what the metric scores against (VQA: 10
                                                answers; empty for an example without
                                                annotations)
``groups``         list of B dicts              what the score is broken down by (VQA:
                                                ``answer_type``, ``question_type``)
================== ============================ ==============================================
"""

import json
import logging
import os
import posixpath
import random
from dataclasses import dataclass, field

import torch
import webdataset as wds
from webdataset.filters import unlisted
from webdataset.utils import make_seed, pytorch_worker_info

from store import CacheReader

from ..errors import PipelineError
from .batch import (
    AttachVectors,
    Collate,
    DropMissing,
    VectorLoader,
    as_is,
)
from .example import DEFAULT_TEXT_LEN
from .inline import INLINE, InlineVectors, attach, lmdb_readers
from .preflight import PreflightReport, preflight
from .remote import is_url, shard_samples

log = logging.getLogger(__name__)

RECORD_FIELDS = ("id", "texts", "vectors", "target", "references")  # pipelines.data.example
DEFAULT_TEXTS = {"question": DEFAULT_TEXT_LEN}


@dataclass
class StreamConfig:
    """How to stream one side (train or eval) of a shard folder.

    Attributes:
        shards: shard paths, or one brace pattern (``qa/train-{000000..000007}.tar``).
        caches: vector field -> cache path, e.g. ``{"image": "cache/"}`` (``--cache image=PATH``); none
            for a text-only model. Each is looked up by the example's own id for that field; a field
            whose path is ``inline`` reads its values from the shards (:mod:`pipelines.data.inline`).
        texts: text field -> its token limit, e.g. ``{"question": 128, "title": 32}``: the text fields
            the batches carry (longer texts are truncated; ByT5 tokens are bytes: the shapes
            questions take up to 70).
        expect: modality -> partial cache metadata the model needs, e.g.
            ``{"image": {"shape": [196, 768], "producer": {"model": "vit_base_patch16_224"}}}``.
        tokenizer: ``byt5`` (no files needed) or a Hugging Face tokenizer name or folder.
        batch_size: records per batch (the last batch may be smaller).
        num_workers: DataLoader worker processes.
        shuffle_buffer: records in the training shuffle buffer (0 or 1: no shuffling).
        seed: seed of the shard order and the shuffle buffer (combined with epoch, rank, worker).
        resample: draw training shards with replacement, endlessly (for DDP; count steps).
        allow_missing: drop records whose id a cache lacks instead of failing (counted by
            :func:`preflight`).
        max_answer_len: the target's token limit.
        inline: field -> the shard manifest's ``inline`` entry, for the fields read inline (the
            manifest's ``inline``; :func:`pipelines.train.streams.stream_settings` fills it).
        pad_multiple: pad text and target tokens to a multiple of this (a compiled step's few
            shapes; :class:`~pipelines.data.batch.Collate`); 1: to each batch's longest.
    """

    shards: list
    caches: dict
    texts: dict = field(default_factory=lambda: dict(DEFAULT_TEXTS))
    expect: dict = field(default_factory=dict)
    tokenizer: str = "byt5"
    batch_size: int = 32
    num_workers: int = 2
    shuffle_buffer: int = 2000
    seed: int = 0
    resample: bool = False
    allow_missing: bool = False
    max_answer_len: int = 32
    inline: dict = field(default_factory=dict)
    pad_multiple: int = 1

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = wds.shardlists.expand_urls(self.shards)
        self.shards = [str(s) for s in self.shards]
        if not self.shards:
            raise ValueError("--shards: no shard files given")
        self.caches = {str(k): v for k, v in self.caches.items()}
        for name in self.inline_fields():
            if name not in self.inline:
                raise ValueError(f"--cache {name}={INLINE}: the shards carry no {name} values (write them with "
                                 f"`vqa-data shards --inline {name}=CACHE`, or give --cache {name}=PATH)")
        for name in self.expect:
            if name not in self.caches:
                raise ValueError(f"--cache {name}=PATH: {name!r} has an expectation but no cache")
        both = sorted(set(self.texts) & set(self.caches))
        if both:
            raise ValueError(f"--cache {both[0]}=PATH: {both[0]!r} is a text field, not a vector field")
        for name, n in self.texts.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"--text-len {name}={n}: must be a positive integer")
        for what, n, low in (("--batch-size", self.batch_size, 1), ("--num-workers", self.num_workers, 0),
                             ("--shuffle-buffer", self.shuffle_buffer, 0),
                             ("--max-answer-len", self.max_answer_len, 2)):
            if not isinstance(n, int) or n < low:
                raise ValueError(f"{what} {n}: must be an integer >= {low}")


    def inline_fields(self) -> list:
        """The vector fields whose values the shards carry (``--cache FIELD=inline``)."""
        return [name for name, path in self.caches.items() if str(path) == INLINE]

    def where(self) -> str:
        """The shard folder, for messages."""
        return posixpath.dirname(self.shards[0]) if is_url(self.shards[0]) else os.path.dirname(self.shards[0])


def rank_info():
    """``(rank, world_size)`` from torch.distributed or the RANK / WORLD_SIZE variables."""
    rank, world_size, _, _ = pytorch_worker_info()
    return rank, world_size


# ---- stages -------------------------------------------------------------------------------------

def decode_json(key: str, data: bytes):
    """The one decoder handler of the stream: JSON members only (never pickle or torch.load; inline
    ``.npy`` members are read by :func:`pipelines.data.inline.attach`, without pickle)."""
    if key.lower().endswith(".json"):
        return json.loads(data)
    return None


def parse_records(sample: dict, inline=()) -> list:
    """A decoded tar sample -> its example dicts (one image's questions: :mod:`pipelines.data.shards`),
    each checked for the fields the stream needs and given the values of the ``inline`` fields
    (:func:`pipelines.data.inline.attach`)."""
    recs = sample.get("json")
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    if not isinstance(recs, list):
        raise PipelineError(f"{where}: no JSON list of examples (shards of another version? write them again "
                            "with `vqa-data shards`)")
    for i, rec in enumerate(recs):
        if not isinstance(rec, dict):
            raise PipelineError(f"{where}: example {i} is not a JSON object")
        for name in RECORD_FIELDS:
            if name not in rec:
                raise PipelineError(f"{where}: example {i} has no {name} (shards of another version? write them "
                                    "again with `vqa-data shards`)")
    attach(recs, sample, where, inline)
    return recs


class ParseRecords:
    """Stream stage: :func:`parse_records` with the inline fields to read (a class: workers pickle it)."""

    def __init__(self, inline=()):
        self.inline = list(inline)

    def __call__(self, sample: dict) -> list:
        return parse_records(sample, self.inline)


class Shuffle:
    """Shuffle buffer seeded by (seed, epoch, rank, worker): reproducible, different per worker."""

    def __init__(self, bufsize: int, seed: int = 0, epoch: int = 0):
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, src):
        if self.bufsize <= 1:
            return src
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(make_seed(self.seed, self.epoch, rank, worker))
        return wds.shuffle(self.bufsize, min(self.bufsize, 100), rng=rng)(src)


# ---- caches ----------------------------------------------------------------------------------------

def open_caches(config: "StreamConfig") -> dict:
    """A reader of each modality's cache, checked against ``config.expect`` (the readers of a cache in
    one process share its LMDB environment: :class:`store.CacheReader`).

    Raises:
        store.MetadataMismatch: a cache was built with other settings than the model expects.
        store.NotACacheError: a path holds no cache.
    """
    return {name: InlineVectors(config.inline[name], config.where(), config.expect.get(name)) if str(path) == INLINE
            else CacheReader(path, expect=config.expect.get(name)) for name, path in config.caches.items()}


def make_collate(config: "StreamConfig") -> Collate:
    collate = Collate(config.texts, list(config.caches), config.tokenizer, config.max_answer_len,
                      inline=config.inline_fields(), pad_multiple=config.pad_multiple)
    collate.tokenizer  # a bad tokenizer fails here, not in a worker (it is not pickled)
    return collate


def read_records(shards, inline=()) -> list:
    """Every record of the shards, in shard order, in this process (eval sets, pre-flight checks).

    Args:
        inline: the fields whose inline values the records get (held in memory as long as the
            records are).
    """
    shards = wds.shardlists.expand_urls(shards) if isinstance(shards, str) else [str(s) for s in shards]
    pipe = wds.DataPipeline(
        wds.SimpleShardList(shards),
        shard_samples(),  # local paths or URLs (pipelines.data.remote)
        wds.decode(decode_json, only=["json"], post=[]),
        wds.map(ParseRecords(inline)),
        unlisted(),
    )
    return list(pipe)


def check_stream(config: StreamConfig, readers: dict | None = None) -> PreflightReport:
    """The pre-flight check of a config: caches match their expectations, every id is present.

    Call it once before training; the training stream then skips (``allow_missing``) or fails on
    missing ids it meets.

    Args:
        config: the side to check.
        readers: the caches, as :func:`open_caches` returns them (opened here if ``None``).
    """
    return preflight(read_records(config.shards), lmdb_readers(readers or open_caches(config)), config.allow_missing)


def check_shards(shard_dir, caches: dict, expect: dict | None = None) -> dict:
    """The pre-flight check of both sides of a shard folder (``vqa-data check``).

    Returns:
        ``{"train": {"records", "missing"}, "eval": {...}}`` and ``"select"`` where the folder has one
        (see :class:`PreflightReport`).

    Raises:
        MissingEmbeddingsError, store.MetadataMismatch: as :func:`check_stream`.
    """
    from .shards import SIDES, read_manifest, shard_paths

    report, readers = {}, None
    manifest = read_manifest(shard_dir)
    for side in (s for s in SIDES if s in manifest):
        config = StreamConfig(shards=shard_paths(shard_dir, side), caches=caches, expect=expect or {},
                              inline=manifest.get("inline", {}))
        readers = readers or open_caches(config)
        r = check_stream(config, readers)
        report[side] = {"records": r.records, "missing": r.missing}
    return report


# ---- training -------------------------------------------------------------------------------------

def train_pipeline(config: StreamConfig, epoch: int = 0, readers: dict | None = None) -> wds.DataPipeline:
    """The workers' part of the training stream: a ``wds.DataPipeline`` of :class:`Collate` batches
    (tokens, ids; no cache values yet: :func:`train_loader` attaches them). Rebuild it, or pass
    ``epoch``, per epoch: the shard order and the shuffle depend on it.

    Raises:
        store.MetadataMismatch, store.NotACacheError: see :func:`open_caches`.
    """
    epoch_seed = make_seed(config.seed, epoch)
    if config.resample:
        source = [wds.ResampledShards(config.shards, seed=epoch_seed, deterministic=True)]
    else:
        _, world = rank_info()
        if len(config.shards) < world * max(config.num_workers, 1):
            log.warning("%d shards for %d nodes x %d workers: some workers get no data",
                        len(config.shards), world, max(config.num_workers, 1))
        source = [wds.SimpleShardList(config.shards, seed=epoch_seed),  # the same order on every node
                  wds.split_by_node, wds.split_by_worker]
    return wds.DataPipeline(
        *source,
        shard_samples(),  # tar members -> {"__key__", "__url__", "json": bytes, ...}; paths or URLs
        wds.decode(decode_json, only=["json"], post=[]),  # JSON only: no pickle, no torch.load
        wds.map(ParseRecords(config.inline_fields())),  # one image's records, with their inline values
        unlisted(),  # -> records
        Shuffle(config.shuffle_buffer, config.seed, epoch),
        DropMissing(lmdb_readers(readers or open_caches(config))) if config.allow_missing else None,  # None: no stage
        wds.batched(config.batch_size, collation_fn=make_collate(config), partial=True),
    )


def train_loader(config: StreamConfig, epoch: int = 0, readers: dict | None = None, **loader_kw) -> VectorLoader:
    """Training batches (see the module docstring): :func:`train_pipeline` in ``num_workers``
    DataLoader workers, the cache values attached in this process.

    Args:
        config, epoch: see :func:`train_pipeline`.
        readers: the caches, as :func:`open_caches` returns them (opened here if ``None``); a run
            opens them once and passes them to every epoch's loader.
    """
    readers = readers or open_caches(config)
    kw = {"num_workers": config.num_workers, **loader_kw}
    if kw["num_workers"] > 0:
        kw.setdefault("prefetch_factor", 4)
    loader = torch.utils.data.DataLoader(train_pipeline(config, epoch, readers), batch_size=None,
                                         collate_fn=as_is, **kw)
    return VectorLoader(loader, AttachVectors(readers))


# ---- eval -----------------------------------------------------------------------------------------

class EvalDataset(torch.utils.data.Dataset):
    """A rank's share of the eval records: records r, r+W, r+2W, ... of rank r out of W."""

    def __init__(self, records: list, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.records = list(records)[rank::world_size]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return self.records[i]


def eval_loader(config: StreamConfig, rank: int | None = None, world_size: int | None = None,
                readers: dict | None = None, records: list | None = None, limit: int | None = None,
                **loader_kw) -> VectorLoader:
    """Fixed-order eval batches of this rank: no shuffling, no resampling, each record once.

    The records pass the pre-flight check first: missing ids raise, or (``allow_missing``) their
    records are dropped and counted. ``readers``: see :func:`train_loader`.

    Args:
        records: the record dicts to score (default: every record of ``config.shards``).
        limit: score only the first ``limit`` records (after the pre-flight check), shared out over
            the ranks, so exactly ``limit`` in all (``None`` or 0: all).
    """
    if rank is None or world_size is None:
        rank, world_size = rank_info()
    readers = readers or open_caches(config)
    records = read_records(config.shards, config.inline_fields()) if records is None else records
    report = preflight(records, lmdb_readers(readers), config.allow_missing)
    kept = report.kept[:limit] if limit else report.kept
    kw = {"num_workers": config.num_workers, **loader_kw}
    if kw["num_workers"] == 0:
        kw.pop("persistent_workers", None)  # DataLoader refuses it without workers
    loader = torch.utils.data.DataLoader(EvalDataset(kept, rank, world_size), batch_size=config.batch_size,
                                         shuffle=False, collate_fn=make_collate(config), **kw)
    return VectorLoader(loader, AttachVectors(readers))
