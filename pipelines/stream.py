"""The training and eval streams: QA shards joined with embedding caches, tokenized and batched.

Training (:func:`train_loader`) runs a ``wds.DataPipeline`` (:func:`train_pipeline`) in the
DataLoader workers::

    shard list (shuffled per epoch; or resampled) -> split by node -> split by DataLoader worker
    -> tar members (read here: :func:`shard_samples`) -> shuffle buffer (seeded per epoch, rank and
    worker) -> JSON decode of the ``json`` member (nothing else: no pickle) -> record -> [drop
    records with missing ids, if allowed] -> batch: tokenize, pad

and attaches each vector modality's cache values by id in the loading process, one copy from the
cache's memory map into the batch (why there and not in the workers: :mod:`pipelines.batch`).
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
:meth:`pipelines.metric.VQAScore.state` combine exactly), and a map-style ``DataLoader`` keeps that
order whatever the number of workers.

A batch is a dict:

================== ============================ ==============================================
key                type                         what
================== ============================ ==============================================
``input_ids``      int64 tensor (B, Lq)         question tokens, right padded with pad id
``attention_mask`` int64 tensor (B, Lq)         1 for question tokens, 0 for padding
``labels``         int64 tensor (B, La)         target answer tokens (with EOS), -100 padding
``vectors``        dict name -> tensor (B, ...) each modality's values, e.g. (B, 196, 768), in
                                                the cache's dtype (float16, bfloat16, float32)
``ids``            dict name -> list of B str   each modality's ids
``question_id``    int64 tensor (B,)
``image_id``       list of B str
``question``       list of B str
``answers``        list of B lists of 10 str    for :class:`pipelines.metric.VQAScore`
``answer_type``    list of B str
``target``         list of B str                the most frequent answer (the labels' text)
================== ============================ ==============================================
"""

import gzip
import json
import logging
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from webdataset.utils import make_seed, pytorch_worker_info

from store import CacheReader

from .batch import DEFAULT_ID_FIELD, AttachVectors, Collate, DropMissing, VectorLoader, as_is
from .errors import PipelineError
from .preflight import PreflightReport, preflight

log = logging.getLogger(__name__)

RECORD_FIELDS = ("question_id", "image_id", "question", "answers", "answer_type")


@dataclass
class StreamConfig:
    """How to stream one side (train or eval) of a shard folder.

    Attributes:
        shards: shard paths, or one brace pattern (``qa/train-{000000..000007}.tar``).
        caches: modality name -> cache path, e.g. ``{"image": "cache/"}`` (``--cache image=PATH``).
        id_fields: modality -> the record field holding its id (default ``image_id``).
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
        max_question_len, max_answer_len: token limits, longer texts are truncated (ByT5 tokens are
            bytes: the shapes questions take up to 70).
    """

    shards: list
    caches: dict
    id_fields: dict = field(default_factory=dict)
    expect: dict = field(default_factory=dict)
    tokenizer: str = "byt5"
    batch_size: int = 32
    num_workers: int = 2
    shuffle_buffer: int = 2000
    seed: int = 0
    resample: bool = False
    allow_missing: bool = False
    max_question_len: int = 128
    max_answer_len: int = 32

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = wds.shardlists.expand_urls(self.shards)
        self.shards = [str(s) for s in self.shards]
        if not self.shards:
            raise ValueError("--shards: no shard files given")
        if not self.caches:
            raise ValueError("--cache: give at least one vector modality, e.g. --cache image=cache/")
        self.caches = {str(k): v for k, v in self.caches.items()}
        for name in list(self.id_fields) + list(self.expect):
            if name not in self.caches:
                raise ValueError(f"--cache {name}=PATH: {name!r} has an id field or expectation but no cache")
        for what, n, low in (("--batch-size", self.batch_size, 1), ("--num-workers", self.num_workers, 0),
                             ("--shuffle-buffer", self.shuffle_buffer, 0),
                             ("--max-question-len", self.max_question_len, 1),
                             ("--max-answer-len", self.max_answer_len, 2)):
            if not isinstance(n, int) or n < low:
                raise ValueError(f"{what} {n}: must be an integer >= {low}")

    def id_field(self, modality: str) -> str:
        return self.id_fields.get(modality, DEFAULT_ID_FIELD)


def rank_info():
    """``(rank, world_size)`` from torch.distributed or the RANK / WORLD_SIZE variables."""
    rank, world_size, _, _ = pytorch_worker_info()
    return rank, world_size


# ---- reading shards ------------------------------------------------------------------------------
# The stream reads its shards itself rather than through ``wds.tarfile_to_samples``: ``tarfile``
# builds a TarInfo per member (~20 us a record on the dev VM: most of a worker's time, and the
# stream's limit on 2 cores); here a header is a few slices (~3 us), and the headers' checksums are
# checked together with numpy before any member of the shard is used.

_BLOCK = 512
_REGULAR = (ord("0"), 0, ord("7"))  # tar type flags of a regular file (as tarfile's isreg)
_META = re.compile(r"__[^/]*__($|/)")  # what webdataset skips: __name__ files and folders


def read_shard(url: str) -> bytes:
    """A whole shard (QA shards are ~1 MB): a path, or any URL ``wds.gopen`` opens (``pipe:...``)."""
    stream = wds.gopen(url, "rb")
    try:
        data = stream.read()
    finally:
        stream.close()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _octal(field: bytes, url: str, offset: int) -> int:
    try:
        return int(field.rstrip(b"\0 ").lstrip() or b"0", 8)
    except ValueError:
        raise PipelineError(f"{url}: not a tar archive, or damaged at byte {offset}") from None


def _pax(data: bytes) -> dict:
    """A PAX extended header's records (``"LEN key=value\\n"``), values as bytes."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        end = pos + int(data[pos:space])
        key, _, value = data[space + 1:end - 1].partition(b"=")
        out[key.decode()] = value
        pos = end
    return out


def tar_members(data: bytes, url: str) -> list:
    """``(name, payload)`` of every regular file of an uncompressed tar archive, in order.

    Reads ustar, GNU long names and PAX ``path``/``size``; skips directories, links and other
    entries. Raises :class:`PipelineError` on a damaged archive (bad checksum, truncated member).
    """
    members, headers, off, end = [], [], 0, len(data)
    name = size = None  # from a GNU long name or PAX header, for the next member
    while off + _BLOCK <= end:
        h = data[off:off + _BLOCK]
        if h[0] == 0 and h.count(0) == _BLOCK:
            break  # end of archive
        headers.append(off)
        start = off + _BLOCK
        length = size if size is not None else _octal(h[124:136], url, off)
        off = start + -(-length // _BLOCK) * _BLOCK
        if off > end:
            raise PipelineError(f"{url}: truncated (a member at byte {start - _BLOCK} runs past the end)")
        kind = h[156]
        if kind == ord("L"):  # GNU: the next member's long name
            name = data[start:start + length].rstrip(b"\0")
            continue
        if kind == ord("x"):  # PAX: the next member's attributes
            pax = _pax(data[start:start + length])
            name, size = pax.get("path", name), int(pax["size"]) if "size" in pax else size
            continue
        if kind == ord("S"):
            raise PipelineError(f"{url}: member at byte {start - _BLOCK} is a GNU sparse file (unsupported)")
        if kind in _REGULAR:
            if name is None:  # ustar: prefix/name (as tarfile reads it)
                name = h[:100].split(b"\0", 1)[0]
                if h[345]:
                    name = h[345:500].split(b"\0", 1)[0] + b"/" + name
            members.append((name.decode("utf-8", "surrogateescape"), data[start:start + length]))
        name = size = None  # directories, links, global headers...: skipped
    if headers:  # every header's checksum: the sum of its bytes, the checksum field counted as spaces
        blocks = np.frombuffer(data, np.uint8, count=end // _BLOCK * _BLOCK).reshape(-1, _BLOCK)
        blocks = blocks[np.asarray(headers) // _BLOCK]  # (H, 512)
        sums = blocks.sum(1, dtype=np.int64) - blocks[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
        signed = sums - 256 * (blocks >= 128).sum(1)  # some writers sum signed bytes (tarfile accepts both)
        stored = np.array([_octal(data[o + 148:o + 156], url, o) for o in headers])
        bad = np.flatnonzero((sums != stored) & (signed != stored))
        if bad.size:
            raise PipelineError(f"{url}: not a tar archive, or damaged (header checksum at byte "
                                f"{headers[bad[0]]})")
    return members


def shard_samples(data: bytes, url: str):
    """Samples of a shard as ``wds.tarfile_to_samples`` makes them: the members sharing a key
    (the name up to the first dot of its last part) -> ``{"__key__", "__url__", ext: bytes}``."""
    sample = None
    for name, payload in tar_members(data, url):
        base = name.rfind("/") + 1
        dot = name.find(".", base)
        if dot <= base or (name.startswith("__") and _META.match(name)):
            continue  # no extension, or webdataset metadata: not part of a sample
        key, ext = name[:dot], name[dot + 1:].lower()
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        elif ext in sample:
            raise PipelineError(f"{url}: {name} appears twice")
        sample[ext] = payload
    if sample is not None:
        yield sample


def tar_samples(src):
    """Stage: shards (``{"url": ...}``, as the shard lists yield them) -> their samples."""
    for shard in src:
        yield from shard_samples(read_shard(shard["url"]), shard["url"])


# ---- records ------------------------------------------------------------------------------------

_JSON = json.JSONDecoder()


def parse_record(sample: dict) -> dict:
    """A tar sample -> the QA record of its ``json`` member (the only member decoded: never pickle
    or torch.load), checked for the fields the stream needs."""
    data = sample.get("json")
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    if data is None:
        raise PipelineError(f"{where}: no JSON record")
    try:
        text = data.decode("utf-8")
        try:
            rec, end = _JSON.raw_decode(text)  # json.loads less its per-call checks: twice as fast
        except ValueError:
            end = -1
        if end != len(text):  # whitespace around it, or not JSON: json.loads decides, and says where
            rec = json.loads(text)
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError
        raise PipelineError(f"{where}: the json member is not JSON ({e})") from None
    if not isinstance(rec, dict):
        raise PipelineError(f"{where}: no JSON record")
    for name in RECORD_FIELDS:
        if name not in rec:
            raise PipelineError(f"{where}: record has no {name}")
    return rec


def parse_records(src):
    """Stage: tar samples -> QA records (:func:`parse_record`)."""
    for sample in src:
        yield parse_record(sample)


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
    return {name: CacheReader(path, expect=config.expect.get(name)) for name, path in config.caches.items()}


def make_collate(config: "StreamConfig") -> Collate:
    collate = Collate({name: config.id_field(name) for name in config.caches}, config.tokenizer,
                      config.max_question_len, config.max_answer_len)
    collate.tokenizer  # a bad tokenizer fails here, not in a worker (it is not pickled)
    return collate


def read_records(shards) -> list:
    """Every record of the shards, in shard order, in this process (eval sets, pre-flight checks)."""
    shards = wds.shardlists.expand_urls(shards) if isinstance(shards, str) else [str(s) for s in shards]
    pipe = wds.DataPipeline(wds.SimpleShardList(shards), tar_samples, parse_records)
    return list(pipe)


def check_stream(config: StreamConfig) -> PreflightReport:
    """The pre-flight check of a config: caches match their expectations, every id is present.

    Call it once before training; the training stream then skips (``allow_missing``) or fails on
    missing ids it meets.
    """
    return preflight(read_records(config.shards), open_caches(config), config.id_fields,
                     config.allow_missing)


# ---- training -------------------------------------------------------------------------------------

def train_pipeline(config: StreamConfig, epoch: int = 0) -> wds.DataPipeline:
    """The workers' part of the training stream: a ``wds.DataPipeline`` of :class:`Collate` batches
    (tokens, ids; no cache values yet: :func:`train_loader` attaches them). Rebuild it, or pass
    ``epoch``, per epoch: the shard order and the shuffle depend on it.

    Raises:
        store.MetadataMismatch, store.NotACacheError: see :func:`open_caches`.
    """
    readers = open_caches(config)
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
        tar_samples,  # tar members -> {"__key__", "__url__", "json": bytes}
        Shuffle(config.shuffle_buffer, config.seed, epoch),
        parse_records,  # the JSON member only: no pickle, no torch.load
        DropMissing(readers, config.id_fields) if config.allow_missing else None,  # None: no stage
        wds.batched(config.batch_size, collation_fn=make_collate(config), partial=True),
    )


def train_loader(config: StreamConfig, epoch: int = 0, **loader_kw) -> VectorLoader:
    """Training batches (see the module docstring): :func:`train_pipeline` in ``num_workers``
    DataLoader workers, the cache values attached in this process."""
    kw = {"num_workers": config.num_workers, **loader_kw}
    if kw["num_workers"] > 0:
        kw.setdefault("prefetch_factor", 4)
    loader = torch.utils.data.DataLoader(train_pipeline(config, epoch), batch_size=None, collate_fn=as_is,
                                         **kw)
    return VectorLoader(loader, AttachVectors(open_caches(config)))


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


def eval_loader(config: StreamConfig, rank: int = None, world_size: int = None, **loader_kw) -> VectorLoader:
    """Fixed-order eval batches of this rank: no shuffling, no resampling, each record once.

    The records pass the pre-flight check first: missing ids raise, or (``allow_missing``) their
    records are dropped and counted.
    """
    if rank is None or world_size is None:
        rank, world_size = rank_info()
    readers = open_caches(config)
    report = preflight(read_records(config.shards), readers, config.id_fields, config.allow_missing)
    loader = torch.utils.data.DataLoader(EvalDataset(report.kept, rank, world_size),
                                         batch_size=config.batch_size, shuffle=False,
                                         num_workers=config.num_workers, collate_fn=make_collate(config),
                                         **loader_kw)
    return VectorLoader(loader, AttachVectors(readers))
