"""Opening the cache's LMDB environment, and the read-only environments a process's readers share.

py-lmdb refuses to open an environment twice in one process ("already open in this process"):
LMDB's locks are POSIX ``fcntl`` locks, which belong to the (process, file) pair, so a second open
would share the first one's locks and closing it would release them. The readers of a cache in one
process therefore lease one read-only environment (:class:`SharedEnvs`).
"""

import os
import threading
from pathlib import Path

from .errors import NotACacheError
from .format import DB_CHECKSUMS, DB_EMBEDDINGS, DB_META, META_KEY, CacheMeta

DEFAULT_MAP_SIZE = 1 << 30  # virtual address space only: the file grows with its content


def _lmdb():
    import lmdb  # lazy: importing the package must not require it

    return lmdb


def is_cache(path) -> bool:
    return (Path(path) / "data.mdb").is_file()


def open_env(path, readonly: bool, map_size: int = DEFAULT_MAP_SIZE):
    """Open the environment at ``path``; read-only opens never create or modify the data file."""
    lmdb = _lmdb()
    path = Path(path)
    if readonly and not is_cache(path):
        what = "does not exist" if not path.exists() else "is not a cache (no data.mdb)"
        raise NotACacheError(f"{path} {what}")
    try:
        if readonly:
            return lmdb.open(str(path), readonly=True, lock=os.access(path, os.W_OK), max_dbs=4,
                             readahead=False, max_readers=1024)
        path.mkdir(parents=True, exist_ok=True)
        # metasync=False: one fsync per commit instead of two; after a system crash the last
        # commit may be undone but the database stays intact (LMDB's MDB_NOMETASYNC).
        return lmdb.open(str(path), map_size=map_size, max_dbs=4, readahead=False, meminit=False,
                         max_readers=1024, metasync=False)
    except lmdb.Error as e:
        raise NotACacheError(f"{path}: cannot open as an LMDB environment ({e})") from None


class SharedEnvs:
    """The read-only environments of this process, one per cache, shared by its readers.

    py-lmdb refuses to open an environment twice in one process (its locks belong to the process
    and file), so readers lease the one open environment of their cache: :meth:`lease` opens it
    (with its databases) or counts one more holder; :meth:`release` counts one less, and the last
    holder's release closes it. Caches are told apart as py-lmdb does, by the identity of their data
    file, and environments by process too (a forked child never uses its parent's).
    """

    def __init__(self):
        self._lock = threading.RLock()  # also serialises mdb_dbi_open, which LMDB requires
        self._envs = {}  # (data file identity, pid) -> [env, dbs dict, holders]

    @staticmethod
    def _key(path):
        try:
            st = os.stat(Path(path) / "data.mdb")
        except OSError:
            return None  # open_env says why
        return st.st_dev, st.st_ino, os.getpid()

    def is_open(self, path) -> bool:
        return self._key(path) in self._envs

    def lease(self, path):
        """``(key, env, dbs)``: this process' read-only environment of the cache at ``path`` and its
        open databases by name (those that exist of :data:`DB_EMBEDDINGS`, :data:`DB_CHECKSUMS`,
        :data:`DB_META`); pair with :meth:`release` of ``key``."""
        with self._lock:
            key = self._key(path)
            entry = self._envs.get(key) if key else None
            if entry is None:
                env = open_env(path, readonly=True)
                key = self._key(path)
                entry = self._envs[key] = [env, _existing_dbs(env), 0]
            entry[2] += 1
            return key, entry[0], entry[1]

    def release(self, key) -> None:
        with self._lock:
            entry = self._envs.get(key)
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] <= 0:
                del self._envs[key]
                if key[2] == os.getpid():  # never close, in a child, what the parent opened
                    entry[0].close()


def _existing_dbs(env) -> dict:
    dbs = {}
    for name in (DB_EMBEDDINGS, DB_CHECKSUMS, DB_META):
        try:
            dbs[name] = env.open_db(name, create=False)
        except _lmdb().Error:
            continue  # absent: left out, and the reader that needs it says so
    return dbs


SHARED = SharedEnvs()  # this process'


def read_meta(env, path, meta_db=None) -> CacheMeta:
    if meta_db is None:
        try:
            meta_db = env.open_db(DB_META, create=False)
        except _lmdb().Error:
            raise NotACacheError(f"{path} is an LMDB environment but not a cache "
                                 "(no metadata record)") from None
    with env.begin(db=meta_db) as txn:
        raw = txn.get(META_KEY)
    if raw is None:
        raise NotACacheError(f"{path} is an LMDB environment but not a cache (no metadata record)")
    return CacheMeta.from_json(raw, path)
