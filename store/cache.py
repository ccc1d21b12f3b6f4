"""Writer and reader of the LMDB embedding cache (format: :mod:`store.format`).

The writer batches entries into transactions of ``batch_size`` values, grows the map when LMDB
reports it full, and skips ids already present unless told to overwrite: a killed writer loses at
most its uncommitted batch, and a rerun carries on.

The reader opens the environment lazily, read-only, once per process: a reader made in the parent
can be handed to DataLoader workers (fork or spawn); each worker opens its own environment, and
readers close before any fork (see ``_close_readers_before_fork``) and reopen on their next read.
The readers of one cache in one process share one read-only environment, counted
(:class:`store.env.SharedEnvs`): it closes when the last of them closes.
"""

import logging
import os
import threading
import weakref
from pathlib import Path

import numpy as np

from .env import DEFAULT_MAP_SIZE, SHARED, _lmdb, damaged, is_cache, open_env, read_meta
from .errors import CorruptValueError, MetadataMismatch, MissingIdError, NotACacheError, StoreError
from .format import (
    DB_CHECKSUMS, DB_EMBEDDINGS, DB_META, META_KEY, CacheMeta, checksum, decode, encode, now_iso,
)

log = logging.getLogger(__name__)

_OPEN_READERS = weakref.WeakSet()


def _close_readers_before_fork():
    """LMDB forbids using an environment across fork, and py-lmdb refuses to reopen in the child
    an environment the parent holds open (closing it there would free the parent's reader slot).
    So readers close before a fork and reopen lazily on their next read, on either side; with every
    reader's lease released, every shared environment (:class:`store.env.SharedEnvs`) is closed."""
    for reader in list(_OPEN_READERS):
        reader.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_readers_before_fork)


_CRC_POOL = None
_CRC_POOL_LOCK = threading.Lock()


def _crc_rows(rows: list) -> list:
    """The CRC-32s of ``rows`` (buffers), in threads when there are several large ones: zlib
    releases the GIL while it sums a buffer over 5 KiB, so the sums of a batch run side by side."""
    global _CRC_POOL
    if len(rows) < 4 or len(rows[0]) < (64 << 10):
        return [checksum(r) for r in rows]
    with _CRC_POOL_LOCK:
        if _CRC_POOL is None or _CRC_POOL[1] != os.getpid():  # a forked child makes its own
            from concurrent.futures import ThreadPoolExecutor

            _CRC_POOL = (ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                            thread_name_prefix="store-crc"), os.getpid())
    return list(_CRC_POOL[0].map(checksum, rows))


def _key(image_id) -> bytes:
    key = str(image_id).encode("utf-8")
    if not key or len(key) > 511:
        raise StoreError(f"id {image_id!r}: ids must be 1..511 bytes of UTF-8")
    return key


class CacheWriter:
    """Writes arrays into a cache, creating it if needed.

    Values go straight into an open LMDB write transaction (LMDB copies them; nothing is queued in
    Python), which commits every ``batch_size`` values and on :meth:`flush`/:meth:`close`. Like any
    LMDB write transaction it belongs to one thread: use a writer from one thread only.

    Args:
        path: directory of the LMDB environment.
        shape: shape of one value; required when creating, checked when reopening.
        dtype: ``float16`` (default), ``bfloat16`` or ``float32``.
        producer: what made the values; when reopening, every key given must equal the stored one
            (a cache built by another model, weights or preprocessing is refused). When creating,
            its keys are the cache's identity (:attr:`store.CacheMeta.identity`) unless
            ``identity`` names them; fields added by :meth:`update_producer` are for information.
        overwrite: replace ids that exist instead of skipping them.
        batch_size: entries per transaction.
        map_size: initial map size in bytes; grown before a transaction that might not fit, and
            doubled whenever LMDB still reports the map full.

    Example:
        >>> with CacheWriter("cache", shape=(196, 768), producer={"model": "vit"}) as w:
        ...     w.put("0", np.zeros((196, 768)))
    """

    def __init__(self, path, shape=None, dtype="float16", producer=None, overwrite=False,
                 batch_size=256, map_size=DEFAULT_MAP_SIZE, identity=None):
        self.path = Path(path)
        self.overwrite = overwrite
        self.batch_size = batch_size
        self.written = 0
        self.skipped = 0
        self._txn = None
        if SHARED.is_open(self.path):
            raise StoreError(f"{self.path}: a CacheReader of this cache is open in this process; close it "
                             "before writing (LMDB opens an environment once per process)")
        if is_cache(self.path):
            from .walk import check_index

            check_index(self.path)  # never write into a damaged cache (nor crash reading it)
        self.env = open_env(self.path, readonly=False, map_size=map_size)
        try:
            self.meta = self._existing_meta()
            if self.meta is None:
                if shape is None:
                    raise StoreError(f"{self.path}: a new cache needs a shape")
                self.meta = CacheMeta(shape=shape, dtype=dtype, producer=dict(producer or {}),
                                      identity=sorted(producer or {}) if identity is None else list(identity))
            else:
                want = {"dtype": dtype, "producer": dict(producer or {})}
                if shape is not None:
                    want["shape"] = list(shape)
                diffs = self.meta.differences(want)
                if diffs:
                    raise MetadataMismatch(self.path, diffs)
            self._open_dbs()
            self.flush()  # a new cache is a cache from here on: its metadata is committed
        except BaseException:
            self._abort()
            self.env.close()
            raise

    def _existing_meta(self):
        """The stored metadata; None for a new environment (or one whose creation was cut short)."""
        try:
            return read_meta(self.env, self.path)
        except NotACacheError:
            with self.env.begin() as txn:
                if txn.get(DB_EMBEDDINGS) is None:
                    return None
            raise

    def _open_dbs(self):
        lmdb = _lmdb()
        while True:
            try:
                self._db = self.env.open_db(DB_EMBEDDINGS)
                self._crc = self.env.open_db(DB_CHECKSUMS)
                self._meta_db = self.env.open_db(DB_META)
                return
            except lmdb.MapFullError:
                self._grow(self.env.info()["map_size"] * 2)

    def _grow(self, new_size: int) -> None:
        log.debug("growing the LMDB map of %s to %d bytes", self.path, new_size)
        self.env.set_mapsize(new_size)

    def _ensure_room(self) -> None:
        """Grow the map before a transaction whose ``batch_size`` values might not fit."""
        info = self.env.info()
        page = self.env.stat()["psize"]
        pages_per_value = -(-self.meta.nbytes // page) + 2  # overflow pages + leaf/branch share
        need = (info["last_pgno"] + 64 + self.batch_size * pages_per_value * 5 // 4) * page
        if need > info["map_size"]:
            self._grow(max(need, info["map_size"] * 2))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _begin(self):
        if self._txn is None:
            self._ensure_room()
            self._txn = self.env.begin(write=True)
            self._thread = threading.get_ident()
            self._batch = []  # (key, value, crc) of this transaction, to redo it if the map fills
            self._batch_written = 0
        elif self._thread != threading.get_ident():
            raise StoreError(f"{self.path}: a CacheWriter was used from two threads; "
                             "an LMDB write transaction belongs to the thread that began it")
        return self._txn

    def __contains__(self, image_id) -> bool:
        return self._begin().get(_key(image_id), db=self._db) is not None

    def missing(self, ids) -> list:
        """The ids (in order) that are not in the cache yet (this batch's puts count as present)."""
        txn = self._begin()
        return [i for i in ids if txn.get(_key(i), db=self._db) is None]

    def put(self, image_id, array) -> None:
        """Write one value (committed with its batch)."""
        self._put(_key(image_id), encode(array, self.meta))

    def put_batch(self, ids, arrays) -> None:
        """Write a batch of values (``arrays``: leading dimension = len(ids)), converted at once."""
        if len(ids) != len(arrays):
            raise StoreError(f"{len(ids)} ids for {len(arrays)} arrays")
        raw = encode(arrays, self.meta)
        n = self.meta.nbytes
        for i, image_id in enumerate(ids):
            self._put(_key(image_id), raw[i * n:(i + 1) * n])

    def put_raw(self, key: bytes, value, crc: bytes) -> None:
        """Write value bytes with their stored checksum (used by merge; sizes are checked)."""
        if len(value) != self.meta.nbytes:
            raise CorruptValueError(f"id {key.decode(errors='replace')!r}: value of {len(value)} bytes, "
                                    f"the cache's values have {self.meta.nbytes}")
        self._put(key, value, crc)

    def _put(self, key: bytes, value, crc: bytes = None) -> None:
        entry = (key, value, crc if crc is not None else checksum(value))
        self._begin()
        self._batch.append(entry)
        try:
            self._put_entry(entry)
        except _lmdb().MapFullError:
            self._redo_batch()  # the batch includes this entry
        except _lmdb().Error as e:
            self._fail(e)
        if len(self._batch) >= self.batch_size:
            self.flush()

    def _put_entry(self, entry) -> None:
        key, value, crc = entry
        if self._txn.put(key, value, db=self._db, overwrite=self.overwrite):
            self._txn.put(key, crc, db=self._crc)
            self._batch_written += 1

    def _redo_batch(self) -> None:
        """The map filled mid-transaction: abort, grow the map, and write the batch again.

        The redo reads this batch's values again from the caller's arrays, so they must not change
        before the batch commits (the map is grown ahead of each batch, so this path is rare).
        """
        lmdb = _lmdb()
        batch = self._batch
        while True:
            self._abort()
            self._grow(self.env.info()["map_size"] * 2)
            self._begin()
            self._batch = batch
            try:
                for entry in batch:
                    self._put_entry(entry)
                return
            except lmdb.MapFullError:
                continue
            except lmdb.Error as e:
                self._fail(e)

    def _fail(self, error):
        self._abort()
        raise StoreError(f"{self.path}: write failed, the last batch was not committed ({error})") from None

    def flush(self) -> None:
        """Commit the open transaction with the updated metadata."""
        lmdb = _lmdb()
        self._begin()
        while True:
            try:
                self._put_meta()
                self._txn.commit()
                break
            except lmdb.MapFullError:
                self._redo_batch()
            except lmdb.Error as e:
                self._fail(e)
        self.written += self._batch_written
        self.skipped += len(self._batch) - self._batch_written
        self._txn = None

    def _put_meta(self) -> None:
        self.meta.count = self._txn.stat(self._db)["entries"]
        self.meta.updated = now_iso()
        self._txn.put(META_KEY, self.meta.to_json(), db=self._meta_db)

    def _abort(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None

    def update_producer(self, **fields) -> None:
        """Add producer fields to the metadata (committed now)."""
        self.meta.producer.update(fields)
        self.flush()

    def close(self) -> None:
        if self.env is None:
            return
        try:
            self.flush()
            self.env.sync(True)
        finally:
            self._abort()
            self.env.close()
            self.env = None


class CacheReader:
    """Reads a cache; opens it read-only and lazily, once per process.

    The readers of one cache in one process share its environment (LMDB opens an environment once
    per process): each has its own read transaction, and closing one leaves the others reading.

    Every value is checked against its CRC-32 the first time this reader returns it (~110 µs for
    301 KB: ``bench/store_bench.py``), so a corrupt value is an error naming its id, never a silent
    input; later reads of the id cost nothing more. An LMDB error (damaged pages) is a
    :class:`CacheDamagedError` naming the cache.

    Args:
        path: directory of the LMDB environment.
        expect: optional partial metadata the caller relies on, e.g.
            ``{"shape": [196, 768], "producer": {"model": "vit_base_patch16_224"}}``;
            any difference raises :class:`MetadataMismatch` naming every differing field.
        verify: check each value's checksum on its first read (default); False only to measure.

    Example:
        >>> with CacheReader("cache", expect={"shape": [196, 768]}) as r:
        ...     x = r["123"]          # np.ndarray (196, 768), float16
    """

    def __init__(self, path, expect=None, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        self._verified = set()  # keys whose checksum this reader has checked
        self._env = self._txn = self._pid = self._lease = None
        key, env, dbs = SHARED.lease(self.path)
        try:
            self.meta = read_meta(env, self.path, dbs.get(DB_META))  # before the data: a clear error first
        finally:
            SHARED.release(key)
        self._set_layout()
        if expect:
            self.check(expect)

    def _set_layout(self):
        self._lmdb_error = _lmdb().Error
        self._nbytes, self._shape = self.meta.nbytes, self.meta.shape
        self._np_dtype = None if self.meta.dtype == "bfloat16" else np.dtype(self.meta.dtype)

    def check(self, expect: dict) -> None:
        diffs = self.meta.differences(expect)
        if diffs:
            raise MetadataMismatch(self.path, diffs)

    def _open(self):
        if self._pid != os.getpid():
            key, env, dbs = SHARED.lease(self.path)
            if DB_EMBEDDINGS not in dbs or DB_CHECKSUMS not in dbs:
                SHARED.release(key)
                raise NotACacheError(f"{self.path} is an LMDB environment but not a cache "
                                     "(no embeddings database)")
            self._env, self._db, self._crc_db = env, dbs[DB_EMBEDDINGS], dbs[DB_CHECKSUMS]
            self._lease = weakref.finalize(self, SHARED.release, key)  # a reader never closed lets go too
            self._txn = None
            self._pid = os.getpid()
            _OPEN_READERS.add(self)
        return self._env

    @property
    def txn(self):
        """A long-lived read transaction of this process (a snapshot of the cache)."""
        if self._txn is None:  # None after a fork or unpickling too: see _close_readers_before_fork
            env = self._open()
            try:
                self._txn = env.begin(buffers=True)
            except self._lmdb_error as e:
                raise damaged(self.path, e) from None
        return self._txn

    def _bad_value(self, image_id, buf) -> StoreError:
        if buf is None:
            return MissingIdError(f"id {str(image_id)!r} is not in cache {self.path}")
        return CorruptValueError(f"id {str(image_id)!r} in {self.path}: value of {len(buf)} bytes, "
                                 f"expected {self._nbytes}")

    def _check(self, txn, keys: list, crcs: list) -> None:
        """Compare values' CRC-32s with the stored ones; the keys pass once per reader."""
        try:
            stored = [txn.get(key, db=self._crc_db) for key in keys]
        except self._lmdb_error as e:
            raise damaged(self.path, e) from None
        for key, crc, want in zip(keys, crcs, stored):
            if want is None or crc != want:
                why = "no checksum recorded" if want is None else "checksum mismatch"
                raise CorruptValueError(f"id {key.decode(errors='replace')!r} in {self.path}: {why}, the "
                                        f"value is corrupted (`store verify {self.path}` lists every bad id; "
                                        "embed it again)")
        self._verified.update(keys)

    def _get(self, txn, key: bytes, image_id):
        """The value buffer of ``key``, its size checked."""
        try:
            buf = txn.get(key, db=self._db)
        except self._lmdb_error as e:
            raise damaged(self.path, e) from None
        if buf is None or len(buf) != self._nbytes:
            raise self._bad_value(image_id, buf)
        return buf

    def __getitem__(self, image_id) -> np.ndarray:
        # The hot path of training: one lookup, one copy out of the map, no per-call setup.
        txn, key = self._txn or self.txn, str(image_id).encode()
        buf = self._get(txn, key, image_id)
        if self.verify and key not in self._verified:
            self._check(txn, [key], [checksum(buf)])
        if self._np_dtype is None:
            return decode(buf, self.meta)
        return np.frombuffer(buf, self._np_dtype).reshape(self._shape).copy()

    def get_batch(self, ids, out: np.ndarray = None) -> np.ndarray:
        """The values of ``ids`` as one array ``(len(ids), *shape)``, each copied once out of the map.

        The array has the cache's dtype, but for bfloat16, which numpy lacks: its bits as ``int16``
        (``torch.from_numpy(a).view(torch.bfloat16)``).

        Args:
            ids: the ids, in the order of the rows.
            out: an array to fill instead: C-contiguous, of the shape and dtype this returns.

        Raises:
            MissingIdError, CorruptValueError, CacheDamagedError: as ``reader[id]``, for the first bad id.
        """
        n, shape, dtype = self._nbytes, (len(ids), *self._shape), np.dtype(self._np_dtype or np.int16)
        if out is None:
            out = np.empty(shape, dtype=dtype)
        elif not out.flags.c_contiguous or out.shape != shape or out.dtype != dtype:
            raise StoreError(f"get_batch: out must be a C-contiguous {dtype} array of shape {shape}")
        rows = memoryview(out.reshape(-1).view(np.uint8))  # (len(ids) * n,): a row = one slice, one memcpy
        txn, unchecked = self._txn or self.txn, []
        for i, image_id in enumerate(ids):
            key = str(image_id).encode()
            rows[i * n:(i + 1) * n] = self._get(txn, key, image_id)
            if self.verify and key not in self._verified:
                unchecked.append((i, key))
        if unchecked:  # the copies are checked: what is returned is what was stored
            crcs = _crc_rows([rows[i * n:(i + 1) * n] for i, _ in unchecked])
            self._check(txn, [key for _, key in unchecked], crcs)
        return out

    def get(self, image_id, default=None):
        try:
            return self[image_id]
        except MissingIdError:
            return default

    def __contains__(self, image_id) -> bool:
        try:
            return self.txn.get(_key(image_id), db=self._db) is not None
        except self._lmdb_error as e:
            raise damaged(self.path, e) from None

    def __len__(self) -> int:
        try:
            return self.txn.stat(self._db)["entries"]
        except self._lmdb_error as e:
            raise damaged(self.path, e) from None

    def keys(self):
        """Every id, in byte order."""
        try:
            with self.txn.cursor(db=self._db) as cur:
                for key in cur.iternext(keys=True, values=False):
                    yield bytes(key).decode("utf-8")
        except self._lmdb_error as e:
            raise damaged(self.path, e) from None

    def keys_raw(self, checksums: bool = False):
        """Every key (bytes) of the values' database, or of the checksums' one, in byte order."""
        try:
            with self.txn.cursor(db=self._crc_db if checksums else self._db) as cur:
                for key in cur.iternext(keys=True, values=False):
                    yield bytes(key)
        except self._lmdb_error as e:
            raise damaged(self.path, e) from None

    def items_raw(self):
        """``(key bytes, value bytes, checksum bytes or None)`` for every entry, in key order.

        Raises:
            CacheDamagedError: at the first damaged page (the entries before it were yielded).
        """
        txn = self.txn
        try:
            with txn.cursor(db=self._db) as cur:
                for key, value in cur:
                    crc = txn.get(key, db=self._crc_db)
                    yield bytes(key), bytes(value), (bytes(crc) if crc is not None else None)
        except self._lmdb_error as e:
            raise damaged(self.path, e) from None

    def missing(self, ids) -> list:
        return [i for i in ids if i not in self]

    def close(self) -> None:
        if self._txn is not None and self._pid == os.getpid():
            self._txn.abort()
        if self._lease is not None:
            self._lease()  # the last reader of the cache in this process closes its environment
        self._env = self._txn = self._pid = self._lease = None
        _OPEN_READERS.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # spawn/pickling: send the path, reopen on the other side
        return {"path": self.path, "meta": self.meta, "verify": self.verify}

    def __setstate__(self, state):
        self.path, self.meta, self.verify = state["path"], state["meta"], state.get("verify", True)
        self._verified = set()
        self._env = self._txn = self._pid = self._lease = None
        self._set_layout()
