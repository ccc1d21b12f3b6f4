"""Opening the cache's LMDB environment, and the read-only environments a process's readers share.

py-lmdb refuses to open an environment twice in one process ("already open in this process"):
LMDB's locks are POSIX ``fcntl`` locks, which belong to the (process, file) pair, so a second open
would share the first one's locks and closing it would release them. The readers of a cache in one
process therefore lease one read-only environment (:class:`SharedEnvs`).
"""

import os
import threading
from pathlib import Path

from .errors import CacheDamagedError, NotACacheError
from .format import DB_CHECKSUMS, DB_EMBEDDINGS, DB_META, META_KEY, CacheMeta

DEFAULT_MAP_SIZE = 1 << 30  # virtual address space only: the file grows with its content
CHECK_LENGTH = True  # off only in store.walk's child, which may crash, to read what precedes a cut


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
            env = lmdb.open(str(path), readonly=True, lock=os.access(path, os.W_OK), max_dbs=4,
                            readahead=False, max_readers=1024)
        else:
            path.mkdir(parents=True, exist_ok=True)
            # metasync=False: one fsync per commit instead of two; after a system crash the last
            # commit may be undone but the database stays intact (LMDB's MDB_NOMETASYNC).
            env = lmdb.open(str(path), map_size=map_size, max_dbs=4, readahead=False, meminit=False,
                            max_readers=1024, metasync=False)
    except lmdb.Error as e:
        raise NotACacheError(f"{path}: cannot open as an LMDB environment ({e})") from None
    try:
        if CHECK_LENGTH:
            check_length(env, path)
    except BaseException:
        env.close()
        raise
    return env


def check_length(env, path) -> None:
    """Refuse a data file shorter than the database it holds (a copy cut short, a full disk).

    LMDB maps the file and follows page numbers into it: a read past its end is SIGBUS, which kills
    the process with no message. The environment's own record of its last page (in the meta pages
    at the start of the file, which a cut leaves) says how long the file must be.

    Raises:
        CacheDamagedError: the file is shorter than ``(last page + 1) × page size``.
    """
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = os.stat(Path(path) / "data.mdb").st_size
    if have < need:
        raise CacheDamagedError(
            f"{path}: data.mdb is {have:,} bytes, shorter than the {need:,} bytes of the database it holds "
            "(truncated: a copy cut short or a full disk); reading it would crash. Restore it from where it "
            "was copied, or embed the images again into a new cache")


def damaged(path, error) -> CacheDamagedError:
    """The :class:`CacheDamagedError` of an LMDB error met while reading the cache at ``path``."""
    why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return CacheDamagedError(f"{path}: the cache is damaged ({why}); "
                             f"`store verify {path}` reports what can still be read; embed the images "
                             "again into a new cache")


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
                try:
                    dbs = _existing_dbs(env, path)
                except BaseException:
                    env.close()
                    raise
                entry = self._envs[key] = [env, dbs, 0]
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


def _existing_dbs(env, path) -> dict:
    lmdb = _lmdb()
    dbs = {}
    for name in (DB_EMBEDDINGS, DB_CHECKSUMS, DB_META):
        try:
            dbs[name] = env.open_db(name, create=False)
        except lmdb.NotFoundError:
            continue  # absent: left out, and the reader that needs it says so
        except lmdb.Error as e:
            raise damaged(path, e) from None
    return dbs


SHARED = SharedEnvs()  # this process'


def _has_db(env, name) -> bool:
    try:
        env.open_db(name, create=False)
        return True
    except _lmdb().Error:
        return False


def _main_db_readable(env) -> bool:
    """Whether the names of the environment's databases can all be read."""
    try:
        with env.begin() as txn:
            for _ in txn.cursor().iternext(keys=True, values=False):
                pass
        return True
    except _lmdb().Error:
        return False


def read_meta(env, path, meta_db=None) -> CacheMeta:
    lmdb = _lmdb()
    try:
        if meta_db is None:
            try:
                meta_db = env.open_db(DB_META, create=False)
            except lmdb.NotFoundError:
                if _has_db(env, DB_EMBEDDINGS) or not _main_db_readable(env):
                    raise damaged(path, "its metadata database cannot be found") from None
                raise NotACacheError(f"{path} is an LMDB environment but not a cache "
                                     "(no metadata record)") from None
        with env.begin(db=meta_db) as txn:
            raw = txn.get(META_KEY)
    except lmdb.Error as e:
        raise damaged(path, e) from None
    if raw is None:
        raise NotACacheError(f"{path} is an LMDB environment without a cache's metadata record (not a cache, "
                             "or its pages are damaged)")
    return CacheMeta.from_json(raw, path)
