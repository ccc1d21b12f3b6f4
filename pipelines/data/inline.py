"""Embeddings carried inline in the shards, for nodes that have no local LMDB cache.

``vqa-data shards ... --inline image=CACHE`` writes, into each shard sample (one run of examples:
:mod:`pipelines.data.shards`), a member ``image.npy``: the values of the distinct ``image`` ids of
the sample's examples, in the order the examples first name them, stacked ``(k, *shape)``, as the
raw ``.npy`` format (``numpy.lib.format``, ``allow_pickle=False`` both ways: never pickle). The
values are the cache's bytes: float16 / float32, or for bfloat16 its bits as int16, as
:meth:`store.CacheReader.get_batch` returns them. For the field that packs the samples (the first
vector field) ``k`` is 1.

The manifest's ``inline`` names each field's cache and its metadata record, so a run checks the
shards' fingerprint (shape, dtype, producer) against what the model expects exactly as it checks an
LMDB cache (:class:`InlineVectors`). ``fuse-train --shards`` uses them without ``--cache`` for that
field (``--cache image=inline`` says it explicitly; ``--cache image=PATH`` joins from an LMDB cache
by id instead).
"""

import io
import json

import numpy as np
import torch

from store import CacheMeta, MetadataMismatch
from store.ops import npy_bytes

from ..errors import PipelineError

INLINE = "inline"  # the --cache value of a field whose values are in the shards
SUFFIX = ".npy"


def member(name: str) -> str:
    """The tar member (webdataset key) of a field's values: ``image.npy``."""
    return name + SUFFIX


def distinct_ids(examples: list, name: str) -> list:
    """The distinct ids of the vector field ``name`` of ``examples``, in first-named order."""
    return list(dict.fromkeys(str(e["vectors"][name]) for e in examples))


def sample_members(examples: list, readers: dict) -> dict:
    """The inline members of one shard sample: ``{"image.npy": bytes}`` per field of ``readers``.

    Args:
        examples: the sample's example dicts.
        readers: field -> :class:`store.CacheReader` (every id present: checked before writing).
    """
    return {member(name): npy_bytes(reader.get_batch(distinct_ids(examples, name)))
            for name, reader in readers.items()}


def manifest_entry(readers: dict) -> dict:
    """The manifest's ``inline``: field -> ``{"cache": path, "meta": the cache's metadata record}``."""
    return {name: {"cache": str(r.path.resolve()), "meta": json.loads(r.meta.to_json())}
            for name, r in readers.items()}


def decode_npy(data: bytes, where: str) -> np.ndarray:
    """A ``.npy`` member's array, read without pickle (an object array is refused).

    Raises:
        PipelineError: not a raw ``.npy`` array, naming ``where``.
    """
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # numpy: "Object arrays cannot be loaded when allow_pickle=False", bad headers
        raise PipelineError(f"{where}: not a raw .npy array ({e})") from None


def attach(examples: list, sample: dict, where: str, names=()) -> None:
    """Give each example of a tar sample the values of the inline fields ``names``:
    ``example["inline"][name]`` = its row of the sample's ``name.npy`` (a view: the examples of one
    image share its array). Other members are not read.

    Raises:
        PipelineError: a member is missing, not a raw ``.npy`` array, or its rows do not match the
            examples' distinct ids.
    """
    for name in names:
        key = member(name)
        if key not in sample:
            continue  # Collate names the example that lacks it
        values = decode_npy(sample[key], f"{where}: {key}")
        try:
            ids = distinct_ids(examples, name)
        except KeyError:
            raise PipelineError(f"{where}: {key} but an example has no vector field {name!r}") from None
        if values.ndim < 1 or values.shape[0] != len(ids):
            raise PipelineError(f"{where}: {key} holds {values.shape[0] if values.ndim else 0} values for "
                                f"{len(ids)} distinct {name} ids")
        row = dict(zip(ids, values))
        for e in examples:
            e.setdefault("inline", {})[name] = row[str(e["vectors"][name])]


class InlineVectors:
    """A field's values carried in the shards: what a run needs of its source in place of a
    :class:`store.CacheReader` (``path``, ``meta``, ``check``); the values come with the examples.

    Args:
        entry: the manifest's ``inline[name]`` (see :func:`manifest_entry`).
        where: the shard folder, for messages.
        expect: partial metadata the model needs, as :class:`store.CacheReader` takes it.

    Raises:
        store.MetadataMismatch: the shards' values were made with other settings.
        PipelineError: the manifest's record is not a cache's metadata.
    """

    inline = True

    def __init__(self, entry: dict, where: str, expect: dict | None = None):
        self.path = f"{where} (inline, from {entry.get('cache', '?')})"
        try:
            self.meta = CacheMeta.from_json(json.dumps(entry["meta"]).encode(), self.path)
        except (KeyError, TypeError, ValueError) as e:
            raise PipelineError(f"{where}: the manifest's inline record is not a cache's metadata ({e})") from None
        if expect:
            self.check(expect)

    def check(self, expect: dict) -> None:
        diffs = self.meta.differences(expect)
        if diffs:
            raise MetadataMismatch(self.path, diffs)


def is_inline(reader) -> bool:
    return getattr(reader, "inline", False)


def lmdb_readers(readers: dict) -> dict:
    """The readers that are LMDB caches (values looked up by id), without the inline fields."""
    return {name: r for name, r in readers.items() if not is_inline(r)}


def batch_values(samples: list, name: str):
    """The inline values of field ``name`` of a batch's examples, stacked ``(B, *shape)`` into a
    tensor in shared memory when this is a DataLoader worker: the loading process then maps it
    instead of receiving a pickled copy through the workers' pipe (1.6x the samples/s on 2 cores:
    ``bench/inline_bench.py``).

    Raises:
        PipelineError: an example came from shards without that field inline.
    """
    try:
        rows = [s["inline"][name] for s in samples]
    except KeyError:
        bad = next(s for s in samples if name not in s.get("inline", {}))
        raise PipelineError(f"example {bad.get('id')}: its shard carries no inline {name!r} values (write the "
                            f"shards with `vqa-data shards --inline {name}=CACHE`, or give --cache {name}=PATH)") from None
    # np.stack: torch.stack of float16 on the CPU measured 25x slower (66 against 2.6 ms for 64 rows)
    out = torch.from_numpy(np.empty((len(rows), *rows[0].shape), dtype=rows[0].dtype))  # (B, *shape)
    if torch.utils.data.get_worker_info() is not None:
        out = out.share_memory_()  # moved before it is filled: the values are written once, into shared memory
    np.stack(rows, out=out.numpy())
    return out
