"""Whole-cache operations behind the ``store`` CLI: info, stats, verify, merge, export."""

import io
import os
from pathlib import Path

import numpy as np

from .cache import CacheReader, CacheWriter
from .env import is_cache
from .errors import CorruptValueError, MetadataMismatch, StoreError
from .format import checksum, decode
from .walk import walk_values


def disk_bytes(path) -> int:
    """Bytes the cache's data file occupies on disk (allocated blocks, not the sparse map size)."""
    st = os.stat(Path(path) / "data.mdb")
    return min(st.st_size, st.st_blocks * 512)


def info(path) -> dict:
    with CacheReader(path) as r:
        meta = r.meta
        count = len(r)
    size = disk_bytes(path)
    payload = count * meta.nbytes
    return {
        "path": str(path),
        "count": count,
        "shape": list(meta.shape),
        "dtype": meta.dtype,
        "bytes_per_value": meta.nbytes,
        "size_on_disk": size,
        "bytes_per_entry": size / count if count else None,
        "overhead": size / payload if payload else None,
        "schema_version": meta.schema_version,
        "created": meta.created,
        "updated": meta.updated,
        "producer": meta.producer,
    }


def stats(array: np.ndarray) -> dict:
    """Summary statistics of one value; NaN/inf are counted and left out of the moments."""
    a = np.asarray(array, dtype=np.float64)
    finite = np.isfinite(a)
    f = a[finite]
    return {
        "shape": list(a.shape),
        "min": float(f.min()) if f.size else None,
        "max": float(f.max()) if f.size else None,
        "mean": float(f.mean()) if f.size else None,
        "std": float(f.std()) if f.size else None,
        "l2_norm": float(np.sqrt((f * f).sum())),
        "nan": int(np.isnan(a).sum()),
        "inf": int(np.isinf(a).sum()),
    }


def check_entry(key: bytes, value, crc, meta) -> str | None:
    """Why an entry is bad (size, checksum, NaN/inf), or None when it is intact."""
    if len(value) != meta.nbytes:
        return f"value of {len(value)} bytes, expected {meta.nbytes}"
    if crc is None:
        return "no checksum recorded"
    if checksum(value) != crc:
        return "checksum mismatch (value corrupted)"
    a = decode(value, meta)
    bad = a.size - int(np.isfinite(a).sum())
    if bad:
        return f"{int(np.isnan(a).sum())} NaN and {int(np.isinf(a).sum())} inf values"
    return None


def verify(path, progress=None, on_total=None) -> dict:
    """Check every entry's size, checksum and finiteness, in a child process (:mod:`store.walk`).

    A damaged page stops the walk, even one that crashes LMDB: the entries before it are reported
    as checked, and the damage as one bad entry ``<damaged>``.

    Returns:
        ``{"checked": n, "bad": [{"id": ..., "reason": ...}, ...], "count_in_meta": m, "damaged": bool}``.
    """
    return walk_values(path, progress, on_total)


def merge(dst, srcs, overwrite=False, batch_size=256) -> dict:
    """Copy every entry of ``srcs`` into ``dst`` (created with the first source's metadata).

    Every source is checked first (what decides the values, :meth:`store.CacheMeta.defining`, equal
    to the destination's; every value intact), so a bad source leaves the destination as it was.
    Fields recorded for information (versions, the embedding run's folders and settings) may differ.

    Returns:
        ``{"copied": n, "skipped": m}`` (skipped: ids already in ``dst``).
    """
    srcs = [Path(s) for s in srcs]
    if not srcs:
        raise StoreError("merge needs at least one source")
    readers = [CacheReader(s) for s in srcs]
    try:
        base = readers[0].meta
        new = not is_cache(dst)
        if not new:
            with CacheReader(dst) as d:
                base = d.meta
        want = base.defining()  # only what decides the values: not versions, folders or settings
        for r in readers:
            diffs = r.meta.differences(want) or [(f, have, want) for f, want, have in
                                                 base.differences(r.meta.defining())]
            if diffs:
                raise MetadataMismatch(r.path, diffs)
            for key, value, crc in r.items_raw():
                reason = check_entry(key, value, crc, r.meta)
                if reason:
                    raise CorruptValueError(f"{r.path}: id {key.decode(errors='replace')!r}: {reason}; "
                                            f"nothing was merged")
        with CacheWriter(dst, shape=base.shape, dtype=base.dtype,
                         producer=base.producer if new else want["producer"], identity=base.identity or None,
                         overwrite=overwrite, batch_size=batch_size) as w:
            for r in readers:
                for key, value, crc in r.items_raw():
                    w.put_raw(key, value, crc)
        return {"copied": w.written, "skipped": w.skipped}
    finally:
        for r in readers:
            r.close()


class AtomicShardWriter:
    """``webdataset.ShardWriter`` whose shards appear under their name only once complete.

    Each shard is written to ``NAME.tmp`` and renamed when it is closed, so a killed writer never
    leaves a half-written shard that a reader would take for a whole one; an exception inside the
    ``with`` block leaves the unfinished shard as ``NAME.tmp`` too.

    Members get ``mtime=0`` unless told otherwise (``webdataset.TarWriter``'s ``mtime``): its
    default, the current time as a float, costs a PAX header per member (twice the tar parsing)
    and makes the bytes differ between runs.
    """

    def __init__(self, pattern, maxcount=10000, **kw):
        import webdataset as wds

        kw.setdefault("mtime", 0)
        self._files = {}
        self.shards = []
        self._writer = wds.ShardWriter(str(pattern), maxcount=maxcount, verbose=0,
                                       opener=self._open, post=self._post, **kw)

    def _open(self, fname):
        f = open(fname + ".tmp", "wb")
        self._files[fname] = f
        return f

    def _post(self, fname):
        self._files.pop(fname).close()
        os.replace(fname + ".tmp", fname)
        self.shards.append(fname)

    def write(self, sample: dict) -> None:
        self._writer.write(sample)

    def next_shard(self) -> None:
        """Close the current shard (renamed into place) and write the next samples to a new one."""
        self._writer.next_stream()

    def close(self) -> None:
        self._writer.close()

    def abandon(self) -> None:
        """Stop without renaming: the unfinished shard stays ``NAME.tmp``.

        The tar stream is closed before its file (closing the file under it would leave the stream
        to flush into a closed file when collected: "ValueError: write to closed file").
        """
        tar, self._writer.tarstream = getattr(self._writer, "tarstream", None), None
        try:
            if tar is not None:
                tar.close()  # ends the archive in NAME.tmp; the file is ours and stays open
        finally:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


def export(path, pattern, maxcount=1000) -> dict:
    """Write the cache to WebDataset tar shards: per entry ``id.txt`` and ``npy`` (the value).

    bfloat16 caches are exported as float32 (exact). ``__key__`` is the entry's index (ids may
    hold dots, which WebDataset reads as extension separators); the id is in ``id.txt``.

    Returns:
        ``{"count": n, "shards": [paths]}``.
    """
    pattern = str(pattern)
    if "%" not in pattern:
        raise StoreError(f"{pattern}: the output pattern needs a shard number, e.g. out-%06d.tar")
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with CacheReader(path) as r:
        if len(r) == 0:
            raise StoreError(f"{path}: the cache is empty, nothing to export")
        with AtomicShardWriter(pattern, maxcount=maxcount) as sink:
            for key, value, _ in r.items_raw():
                sink.write({"__key__": f"{n:09d}", "id.txt": key.decode("utf-8"),
                            "npy": npy_bytes(decode(value, r.meta))})
                n += 1
    return {"count": n, "shards": sink.shards}
