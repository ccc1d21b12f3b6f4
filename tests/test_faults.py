"""Damaged caches: every tool names the damage and the cache, never crashes, never trains on it.

The home of the damage cases (a cut data file, damaged index pages, flipped value bytes, caches
that differ only in what they record for information): the next fault found goes here too. Each
case runs the real CLIs in a subprocess, so a crash (SIGBUS, SIGSEGV) fails the test instead of
killing the test run.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

from store import CacheDamagedError, CacheReader, CacheWriter, CorruptValueError
from store.walk import check_index

SHAPE = (32, 16)  # 1 KiB of float16: each value on 1 overflow page
N = 200
P_LEAF, P_OVERFLOW = 0x02, 0x04


def make_cache(path: Path, n: int = N, producer=None) -> Path:
    """A cache of ``n`` values, compacted: every page in its file is live (no stale copies left
    by copy-on-write), so the page that holds a key is the one LMDB reads."""
    draft = path.with_name(path.name + ".draft")
    with CacheWriter(draft, shape=SHAPE, producer=producer or {"model": "m"}) as w:
        for i in range(n):
            w.put(str(i), np.full(SHAPE, i, dtype=np.float16))  # each value its own bytes
    path.mkdir()
    env = lmdb.open(str(draft), readonly=True, max_dbs=8, lock=False)
    env.copy(str(path), compact=True)
    env.close()
    shutil.rmtree(draft)
    return path


def cli(*args, input=None):
    """Run a console script as a user does; a crash shows as a negative return code."""
    exe = Path(sys.executable).parent / args[0]
    return subprocess.run([str(exe), *map(str, args[1:])], capture_output=True, text=True, input=input,
                          timeout=120)


def pages(path: Path):
    """``(page number, flags, bytes)`` of every page that starts with its own header. LMDB's page
    header: pgno (u64), pad (u16), flags (u16), lower (u16), upper (u16)."""
    data = (path / "data.mdb").read_bytes()
    psize = 4096
    for i in range(len(data) // psize):
        page = data[i * psize:(i + 1) * psize]
        pgno, _, flags = struct.unpack_from("<QHH", page)
        if pgno == i:
            yield i, flags, page


def leaf_nodes(page: bytes):
    """``(offset of the key's bytes, key)`` of each node of a leaf page, from its pointer table:
    the page header ends with ``lower`` (u16 at 12), the end of the u16 node offsets that follow it;
    a node is lo, hi, flags, ksize (u16 each), then the key. Free space inside a page holds stale
    bytes, so a key is found through the table, never by searching the page's bytes."""
    lower = struct.unpack_from("<H", page, 12)[0]
    for k in range((lower - 16) // 2):
        at = struct.unpack_from("<H", page, 16 + 2 * k)[0]
        ksize = struct.unpack_from("<H", page, at + 6)[0]
        yield at + 8, page[at + 8:at + 8 + ksize]


def leaf_holding(path: Path, key: bytes) -> tuple[int, int]:
    """``(page number, offset in the page)`` of ``key`` in the leaf page that holds it (the last
    such page: a key of the values' database is also one of the checksums' database)."""
    found = [(i, at) for i, flags, page in pages(path) if flags & P_LEAF
             for at, k in leaf_nodes(page) if k == key]
    assert found, key
    return found[-1]


def damage(path: Path, pgno: int, offset: int, data: bytes) -> None:
    with open(path / "data.mdb", "r+b") as f:
        f.seek(pgno * 4096 + offset)
        f.write(data)


@pytest.fixture
def cache(tmp_path):
    return make_cache(tmp_path / "cache")


def test_a_cut_data_file_is_named_by_every_tool_not_a_bus_error(cache, tmp_path):
    size = (cache / "data.mdb").stat().st_size
    os.truncate(cache / "data.mdb", size // 2)
    for args in (["verify", cache], ["get", cache, "7"], ["info", cache], ["ls", cache]):
        r = cli("store", *args)
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        assert f"{cache}: data.mdb is {size // 2:,} bytes, shorter than the {size:,} bytes of the database" in \
            (r.stdout + r.stderr), args
        assert "Traceback" not in r.stderr
    with pytest.raises(CacheDamagedError, match="shorter than"):
        CacheReader(cache)
    with pytest.raises(CacheDamagedError, match="shorter than"):
        CacheWriter(cache, shape=SHAPE, producer={"model": "m"})  # an embed resume into it


def test_damaged_index_pages_are_named_not_a_traceback_or_a_crash(cache, tmp_path):
    # The main database's leaf page: the names of the cache's three databases.
    main = tmp_path / "main"
    shutil.copytree(cache, main)
    damage(main, leaf_holding(main, b"embeddings")[0], 16, os.urandom(64))
    for args in (["verify", main], ["get", main, "7"], ["info", main]):
        r = cli("store", *args)
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        assert f"{main}: the cache is damaged" in r.stdout + r.stderr, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
    # A leaf of the values' database, its node offsets overwritten: LMDB reads garbage.
    leaf = tmp_path / "leaf"
    shutil.copytree(cache, leaf)
    damage(leaf, leaf_holding(leaf, b"199")[0], 16, b"\xff" * 64)
    r = cli("store", "verify", leaf, "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    report = json.loads(r.stdout)
    assert report["damaged"] and report["bad"][-1]["id"] == "<damaged>"
    with pytest.raises(CacheDamagedError, match=f"{leaf}: the cache is damaged"):
        check_index(leaf)


def test_a_damaged_key_is_reported_as_damage_not_as_a_missing_id(cache, tmp_path):
    # One byte of one id in the values' leaf: a lookup of "123" now finds nothing, which the
    # pre-flight check used to report as "lacks 1 of N ids".
    pgno, at = leaf_holding(cache, b"123")
    damage(cache, pgno, at, b"12\x7f")
    # (the page holding "123" may be the values' leaf or the checksums' one: either is damage)
    with pytest.raises(CacheDamagedError, match=r"first difference: value id '12(3|\\x7f)', checksum id '12"):
        check_index(cache)
    records = [{"id": i, "texts": {"question": "q?"}, "vectors": {"image": str(i)}, "target": "a",
                "references": ["a"]} for i in range(N)]  # example dicts (pipelines.data.example)
    from pipelines.data.preflight import preflight

    with CacheReader(cache) as r, pytest.raises(CacheDamagedError, match="the cache is damaged"):
        preflight(records, {"image": r})


def test_a_flipped_value_is_never_read_as_data(cache):
    # Flip bytes inside id 7's value (its overflow page holds 1 KiB of 7.0 in float16).
    seven = np.full(SHAPE, 7, dtype=np.float16).tobytes()
    data = (cache / "data.mdb").read_bytes()
    at = data.index(seven)
    with open(cache / "data.mdb", "r+b") as f:
        f.seek(at + 100)
        f.write(b"\x00\x7c")  # one float16 becomes inf: plausible, and wrong
    r = cli("store", "get", cache, "7")
    assert r.returncode == 1 and "Error: " in r.stderr
    assert f"id '7' in {cache}: checksum mismatch, the value is corrupted" in r.stderr
    with CacheReader(cache) as reader:
        with pytest.raises(CorruptValueError, match="id '7'"):
            reader["7"]
        with pytest.raises(CorruptValueError, match="id '7'"):
            reader.get_batch(["6", "7"])
        assert float(reader["8"][0, 0]) == 8.0  # the others read as before
    with CacheReader(cache, verify=False) as reader:  # only when asked, e.g. to measure
        assert np.isinf(reader["7"]).sum() == 1
    r = cli("store", "verify", cache)
    assert r.returncode == 1 and "7\tchecksum mismatch" in r.stdout


def test_merge_compares_only_what_decides_the_values(tmp_path):
    identity = {"model": "vit", "weights_hash": "abc", "preprocessing": {"size": 48}}
    a, b = tmp_path / "a", tmp_path / "b"
    for path, folder, start in ((a, "images/part1", 0), (b, "images/part2", 100)):
        with CacheWriter(path, shape=SHAPE, producer=identity) as w:
            # fields for information, as embed records them after creating the cache
            w.update_producer(embed_config={"images": [folder], "out": str(path)}, versions={"timm": "1"})
            for i in range(start, start + 5):
                w.put(str(i), np.zeros(SHAPE))
    assert CacheReader(a).meta.identity == ["model", "preprocessing", "weights_hash"]
    r = cli("store", "merge", tmp_path / "all", a, b)
    assert r.returncode == 0, r.stderr
    assert len(CacheReader(tmp_path / "all")) == 10
    c = tmp_path / "c"  # other weights: refused, naming the field
    with CacheWriter(c, shape=SHAPE, producer={**identity, "weights_hash": "zzz"}) as w:
        w.put("99", np.zeros(SHAPE))
    r = cli("store", "merge", tmp_path / "all", c)
    assert r.returncode == 1 and "producer.weights_hash: cache has 'zzz', expected 'abc'" in r.stderr


def test_store_output_into_a_closed_pipe_ends_quietly(cache):
    p = subprocess.run(f"'{Path(sys.executable).parent / 'store'}' ls '{cache}' | head -1", shell=True,
                       capture_output=True, text=True, timeout=60)
    assert p.stdout == "0\n" and p.stderr == ""
