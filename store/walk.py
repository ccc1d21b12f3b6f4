"""Walk a cache in a child process, so that damage which crashes LMDB is reported, not fatal.

LMDB trusts its pages: a damaged branch or leaf page can send it outside the map (SIGSEGV) or past
the end of a short file (SIGBUS), killing the process with no message; damage it does notice is an
``lmdb.Error`` (``MDB_PAGE_NOTFOUND``, ``MDB_CORRUPTED``). The walk therefore runs in a child
(``python -m store.walk``) that reports each finding as a JSON line on stdout; the parent keeps
what arrived before a crash, so ``store verify`` says what it could check before the damage.

Two walks:

- ``index`` (:func:`check_index`): every key of the embeddings and checksums databases (the
  branch and leaf pages only, not the values: a few ms per 10,000 entries), counted against the
  databases' own entry counts. The pre-flight check of a run uses it.
- ``values`` (:func:`walk_values`): every entry's size, checksum and finiteness
  (:func:`store.ops.check_entry`), for ``store verify``.
"""

import itertools
import json
import signal
import subprocess
import sys

from . import errors
from . import env
from .env import open_env
from .errors import CacheDamagedError, StoreError

PROGRESS_EVERY = 1  # entries between progress lines: each, so a crash loses none of the count


def _run(path, kind: str, on_line=None) -> list:
    """Run the walk ``kind`` over ``path`` in a child; its JSON lines (``on_line`` sees each as it
    comes), with a last line ``{"crashed": "SIGSEGV"}`` if the child died of a signal."""
    proc = subprocess.Popen([sys.executable, "-m", "store.walk", kind, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for raw in proc.stdout:
        line = json.loads(raw)
        if "error" in line:  # not a cache, another schema: the error the reader raised, as it was
            proc.wait()
            raise getattr(errors, line["type"], StoreError)(line["error"])
        lines.append(line)
        if on_line:
            on_line(line)
    err = proc.stderr.read()
    rc = proc.wait()
    if rc < 0:
        lines.append({"crashed": signal.Signals(-rc).name})
    elif rc != 0:
        raise StoreError(f"{path}: the walk of the cache failed (exit {rc}): {err.strip()[-500:]}")
    return lines


def _crash_message(path, sig: str, checked: int, last) -> str:
    after = f", after {checked} entries (the last one read: {last!r})" if checked else ""
    try:  # a cut file is the likely cause of a SIGBUS: say so, with the sizes
        open_env(path, readonly=True).close()
    except CacheDamagedError as e:
        return f"{e} (the walk crashed with {sig}{after})"
    return (f"{path}: the cache is damaged: reading it crashed LMDB ({sig}){after}; embed the images "
            "again into a new cache")


def check_index(path) -> dict:
    """Walk the keys of the cache at ``path`` in a child process; raise on any damage.

    Returns:
        ``{"entries": n, "checksums": m}``.

    Raises:
        CacheDamagedError: an LMDB error or crash, or key counts that differ from the databases'
            own counts or from each other.
    """
    lines = _run(path, "index")
    last = lines[-1] if lines else {}
    if "crashed" in last:
        raise CacheDamagedError(_crash_message(path, last["crashed"], 0, None))
    if "damaged" in last:
        raise CacheDamagedError(last["damaged"])
    done = last.get("done")
    if done is None:
        raise StoreError(f"{path}: the walk of the cache ended without a result")
    diff = done["first_diff"]
    if diff or not done["entries"] == done["entries_counted"] == done["checksums"]:
        where = f" (first difference: value id {diff[0]!r}, checksum id {diff[1]!r})" if diff else ""
        raise CacheDamagedError(
            f"{path}: the cache is damaged: its index counts {done['entries']} entries, a walk finds "
            f"{done['entries_counted']} values and {done['checksums']} checksums{where}; `store verify "
            f"{path}` reports what can still be read; embed the images again into a new cache")
    return {"entries": done["entries"], "checksums": done["checksums"]}


def walk_values(path, progress=None, on_total=None) -> dict:
    """Check every entry of the cache at ``path`` in a child process (see :func:`store.ops.verify`);
    ``progress(k)`` is called with each k entries checked, ``on_total(n)`` with the entry count."""
    state = {"checked": 0, "last": None}

    def on_line(line):
        if "entries" in line and on_total:
            on_total(line["entries"])
        if "n" in line:
            if progress:
                progress(line["n"] - state["checked"])
            state["checked"], state["last"] = line["n"], line["last"]

    lines = _run(path, "values", on_line)
    bad = [line["bad"] for line in lines if "bad" in line]
    last = lines[-1] if lines else {}
    if "crashed" in last or "damaged" in last:
        checked, last_id = state["checked"], state["last"]
        if "crashed" in last:
            why = _crash_message(path, last["crashed"], checked, last_id)
        else:
            after = f" (the last one read: {last_id!r})" if checked else ""
            why = f"{last['damaged']}; {checked} entries were checked before the damage{after}"
        bad.append({"id": "<damaged>", "reason": why + ", the rest could not be read"})
        return {"checked": checked, "bad": bad, "count_in_meta": last.get("meta_count"), "damaged": True}
    done = last["done"]
    if progress:
        progress(done["checked"] - state["checked"])
    if done["entries"] != done["checked"]:
        bad.append({"id": "<index>", "reason": f"the index counts {done['entries']} entries, "
                    f"{done['checked']} were read: damaged pages"})
    if done["meta_count"] != done["checked"]:
        bad.append({"id": "<metadata>", "reason": f"count {done['meta_count']} in metadata, "
                    f"{done['checked']} entries"})
    return {"checked": done["checked"], "bad": bad, "count_in_meta": done["meta_count"], "damaged": False}


def _emit(**line) -> None:
    print(json.dumps(line, ensure_ascii=False), flush=True)


def _walk_index(reader) -> None:
    """Both databases' keys side by side: they must be the same ids (a damaged key in one of them,
    which a lookup would take for a missing id, shows as a difference)."""
    entries = len(reader)
    values, checksums = reader.keys_raw(), reader.keys_raw(checksums=True)
    counted = n_crc = 0
    first_diff = None
    for a, b in itertools.zip_longest(values, checksums):
        counted += a is not None
        n_crc += b is not None
        if a != b and first_diff is None:
            first_diff = [x.decode("utf-8", errors="replace") if x is not None else None for x in (a, b)]
    _emit(done={"entries": entries, "entries_counted": counted, "checksums": n_crc, "first_diff": first_diff})


def _walk_values(reader) -> None:
    from .ops import check_entry

    meta_count = reader.meta.count
    entries = len(reader)
    _emit(entries=entries)
    checked, key = 0, b""
    for key, value, crc in reader.items_raw():
        reason = check_entry(key, value, crc, reader.meta)
        if reason:
            _emit(bad={"id": key.decode("utf-8", errors="replace"), "reason": reason})
        checked += 1
        if checked % PROGRESS_EVERY == 0:
            _emit(n=checked, last=key.decode("utf-8", errors="replace"))
    _emit(n=checked, last=key.decode("utf-8", errors="replace"))
    _emit(done={"checked": checked, "entries": entries, "meta_count": meta_count})


def main(argv=None) -> int:
    from .cache import CacheReader

    kind, path = (argv or sys.argv[1:])[:2]
    if kind == "values":
        env.CHECK_LENGTH = False  # read up to the cut (this process may crash: the parent reports it)
    try:
        with CacheReader(path, verify=False) as reader:
            (_walk_index if kind == "index" else _walk_values)(reader)
    except CacheDamagedError as e:
        _emit(damaged=str(e))
    except StoreError as e:
        _emit(error=str(e), type=type(e).__name__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
