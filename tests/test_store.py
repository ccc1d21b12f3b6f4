"""The LMDB embedding cache: format, writer, reader, merge, export (real LMDB files in tmp_path)."""

import gc
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch

from store import (
    AtomicShardWriter,
    CacheReader,
    CacheWriter,
    CorruptValueError,
    MetadataMismatch,
    MissingIdError,
    NotACacheError,
    SchemaError,
    StoreError,
    ValueShapeError,
    export,
    merge,
    verify,
)
from store.format import DB_EMBEDDINGS, DB_META, META_KEY

SHAPE = (6, 4)


def make_cache(path, ids, dtype="float16", seed=0, **kw):
    rng = np.random.default_rng(seed)
    values = {i: rng.standard_normal(SHAPE).astype(np.float32) for i in ids}
    with CacheWriter(path, shape=SHAPE, dtype=dtype, producer={"model": "m"}, **kw) as w:
        for i, v in values.items():
            w.put(i, v)
    return values


def corrupt_one_value(path, image_id):
    """Flip bytes of one stored value behind the checksum's back (a real write to the LMDB file)."""
    import lmdb

    env = lmdb.open(str(path), max_dbs=4)
    db = env.open_db(DB_EMBEDDINGS)
    with env.begin(write=True, db=db) as txn:
        value = bytearray(txn.get(image_id.encode()))
        value[0] ^= 0xFF
        value[1] ^= 0x0F
        txn.put(image_id.encode(), bytes(value))
    env.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_every_dtype(tmp_path, dtype):
    values = make_cache(tmp_path / "c", ["0", "1", "2"], dtype=dtype)
    with CacheReader(tmp_path / "c") as r:
        assert r.meta.dtype == dtype and r.meta.shape == SHAPE and len(r) == 3
        for i, v in values.items():
            expected = torch.from_numpy(v).to(getattr(torch, dtype)).float().numpy()
            got = r[i]
            assert got.shape == SHAPE
            np.testing.assert_array_equal(got.astype(np.float32), expected)


def test_torch_bfloat16_input_is_stored_exactly(tmp_path):
    t = torch.randn(*SHAPE).to(torch.bfloat16)
    with CacheWriter(tmp_path / "c", shape=SHAPE, dtype="bfloat16") as w:
        w.put_batch(["a"], t[None])
    with CacheReader(tmp_path / "c") as r:
        np.testing.assert_array_equal(r["a"], t.float().numpy())


def test_id_zero_and_non_ascii_ids(tmp_path):
    ids = ["0", "00", "Ω-ünïcødé", "猫/1", "a b"]
    values = make_cache(tmp_path / "c", ids)
    with CacheReader(tmp_path / "c") as r:
        assert sorted(r.keys()) == sorted(ids)
        for i in ids:
            np.testing.assert_allclose(r[i], values[i], atol=1e-2)
        assert "0" in r and 0 in r and "1" not in r


def test_resume_skips_existing_and_overwrite_replaces(tmp_path):
    first = make_cache(tmp_path / "c", ["a", "b"], seed=0)
    with CacheWriter(tmp_path / "c", shape=SHAPE, producer={"model": "m"}) as w:
        assert w.missing(["a", "b", "c"]) == ["c"]
        w.put("a", np.full(SHAPE, 7.0))
        w.put("c", np.full(SHAPE, 3.0))
    assert (w.written, w.skipped) == (1, 1)
    with CacheReader(tmp_path / "c") as r:
        np.testing.assert_allclose(r["a"], first["a"], atol=1e-2)  # kept, not overwritten
        assert r["c"][0, 0] == 3.0 and r.meta.count == 3
    with CacheWriter(tmp_path / "c", overwrite=True, producer={"model": "m"}) as w:
        w.put("a", np.full(SHAPE, 7.0))
    with CacheReader(tmp_path / "c") as r:
        assert r["a"][0, 0] == 7.0 and len(r) == 3


def test_map_grows_from_a_tiny_initial_map(tmp_path):
    shape = (196, 768)
    with CacheWriter(tmp_path / "c", shape=shape, map_size=64 * 1024, batch_size=8) as w:
        for i in range(40):
            w.put(str(i), np.full(shape, i, dtype=np.float16))
    with CacheReader(tmp_path / "c") as r:
        assert len(r) == 40 and r["39"][5, 5] == 39
    assert verify(tmp_path / "c")["bad"] == []


def test_map_full_mid_batch_grows_and_redoes_the_batch(tmp_path, monkeypatch):
    """The writer grows the map ahead of each batch; if LMDB still fills it, the batch is redone."""
    monkeypatch.setattr(CacheWriter, "_ensure_room", lambda self: None)
    shape = (196, 768)
    with CacheWriter(tmp_path / "c", shape=shape, map_size=64 * 1024, batch_size=16) as w:
        w.put("dup", np.full(shape, -1, dtype=np.float16))
        for i in range(40):
            w.put(str(i), np.full(shape, i, dtype=np.float16))
        w.put("dup", np.full(shape, -2, dtype=np.float16))  # skipped: exists
    assert (w.written, w.skipped) == (41, 1)
    with CacheReader(tmp_path / "c") as r:
        assert len(r) == 41 and r["39"][5, 5] == 39 and r["dup"][0, 0] == -1
    assert verify(tmp_path / "c")["bad"] == []


def test_a_writer_refuses_a_second_thread(tmp_path):
    import threading

    with CacheWriter(tmp_path / "c", shape=SHAPE) as w:
        w.put("a", np.zeros(SHAPE))
        errors = []
        t = threading.Thread(target=lambda: errors.append(pytest.raises(StoreError, w.put, "b", np.zeros(SHAPE))))
        t.start()
        t.join()
    assert "used from two threads" in str(errors[0].value)


def test_uncommitted_batch_is_lost_whole_and_committed_ones_kept(tmp_path):
    """A writer that dies before its batch commits leaves the cache as of the last commit."""
    path = tmp_path / "c"
    with CacheWriter(path, shape=SHAPE, batch_size=2) as w:
        w.put("a", np.ones(SHAPE))
        w.put("b", np.ones(SHAPE))  # batch of 2: committed
        w.put("c", np.ones(SHAPE))  # pending
        w.env.close()  # simulate death: the pending batch never reaches a transaction
        w.env = None
    with CacheReader(path) as r:
        assert sorted(r.keys()) == ["a", "b"] and r.meta.count == 2
    assert verify(path)["bad"] == []


def _read_all(reader, ids, queue):
    queue.put({i: float(reader[i].sum()) for i in ids})


class _DS(torch.utils.data.Dataset):
    def __init__(self, reader, ids):
        self.reader, self.ids = reader, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, k):
        return self.ids[k], torch.from_numpy(self.reader[self.ids[k]])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_in_two_worker_dataloader(tmp_path, method):
    ids = [str(i) for i in range(24)]
    values = make_cache(tmp_path / "c", ids)
    reader, other = CacheReader(tmp_path / "c"), CacheReader(tmp_path / "c")
    reader["0"], other["1"]  # one environment, open in the parent before the workers start
    loader = torch.utils.data.DataLoader(_DS(reader, ids), batch_size=4, num_workers=2,
                                         multiprocessing_context=method)
    seen = {}
    for batch_ids, batch in loader:
        for i, v in zip(batch_ids, batch):
            seen[i] = v.numpy()
    assert sorted(seen) == sorted(ids)
    for i in ids:
        np.testing.assert_allclose(seen[i], values[i], atol=1e-2)
    assert reader["5"].shape == SHAPE  # the parent's readers still work after the workers
    np.testing.assert_allclose(other["6"], values["6"], atol=1e-2)
    reader.close()
    other.close()


def test_readers_of_one_cache_in_one_process_share_its_environment(tmp_path):
    values = make_cache(tmp_path / "c", ["a", "b"])
    (tmp_path / "link").symlink_to(tmp_path / "c")  # the same files by another path: the same cache
    first, second = CacheReader(tmp_path / "c"), CacheReader(tmp_path / "link")
    np.testing.assert_allclose(first["a"], values["a"], atol=1e-2)
    np.testing.assert_allclose(second["b"], values["b"], atol=1e-2)  # py-lmdb alone: "already open"
    assert first.txn is not second.txn and first._env is second._env
    first.close()
    np.testing.assert_allclose(second["a"], values["a"], atol=1e-2)  # closing one leaves the other
    with pytest.raises(StoreError, match="a CacheReader of this cache is open in this process"):
        CacheWriter(tmp_path / "c", shape=SHAPE, producer={"model": "m"})
    third = CacheReader(tmp_path / "c")
    assert third["b"].shape == SHAPE
    second.close()
    third.close()
    with CacheWriter(tmp_path / "c", shape=SHAPE, producer={"model": "m"}) as w:  # the last one closed it
        w.put("c", np.ones(SHAPE))
    with CacheReader(tmp_path / "c") as r:
        assert len(r) == 3


def test_a_reader_dropped_without_close_lets_go_of_the_environment(tmp_path):
    make_cache(tmp_path / "c", ["a"])
    reader = CacheReader(tmp_path / "c")
    reader["a"]
    del reader
    gc.collect()
    with CacheWriter(tmp_path / "c", shape=SHAPE, producer={"model": "m"}) as w:
        w.put("b", np.ones(SHAPE))


def test_verify_finds_a_value_corrupted_on_disk(tmp_path):
    make_cache(tmp_path / "c", ["a", "b", "c"])
    assert verify(tmp_path / "c") == {"checked": 3, "bad": [], "count_in_meta": 3, "damaged": False}
    corrupt_one_value(tmp_path / "c", "b")
    report = verify(tmp_path / "c")
    assert report["bad"] == [{"id": "b", "reason": "checksum mismatch (value corrupted)"}]


def test_verify_reports_nan_and_inf(tmp_path):
    with CacheWriter(tmp_path / "c", shape=SHAPE) as w:
        bad = np.zeros(SHAPE)
        bad[0, 0], bad[1, 1] = np.nan, np.inf
        w.put("x", bad)
        w.put("y", np.zeros(SHAPE))
    assert verify(tmp_path / "c")["bad"] == [{"id": "x", "reason": "1 NaN and 1 inf values"}]


def test_metadata_mismatch_names_every_field(tmp_path):
    make_cache(tmp_path / "c", ["a"])
    with pytest.raises(MetadataMismatch) as e:
        CacheReader(tmp_path / "c", expect={"shape": [196, 768], "dtype": "float16",
                                            "producer": {"model": "vit_base_patch16_224"}})
    assert str(e.value) == (
        f"cache {tmp_path / 'c'} was built with other settings:\n"
        "  shape: cache has [6, 4], expected [196, 768]\n"
        "  producer.model: cache has 'm', expected 'vit_base_patch16_224'")
    with pytest.raises(MetadataMismatch, match="producer.model: cache has 'm', expected 'other'"):
        CacheWriter(tmp_path / "c", shape=SHAPE, producer={"model": "other"})


def test_bad_paths_and_values(tmp_path):
    with pytest.raises(NotACacheError, match="does not exist"):
        CacheReader(tmp_path / "nope")
    (tmp_path / "dir").mkdir()
    with pytest.raises(NotACacheError, match=r"is not a cache \(no data.mdb\)"):
        CacheReader(tmp_path / "dir")
    make_cache(tmp_path / "c", ["a"])
    with CacheReader(tmp_path / "c") as r:
        with pytest.raises(MissingIdError, match="id 'zz' is not in cache"):
            r["zz"]
        assert r.get("zz") is None
    with CacheWriter(tmp_path / "c") as w:
        with pytest.raises(ValueShapeError, match=r"array of shape \(3, 4\) does not fit the cache's shape \(6, 4\)"):
            w.put("b", np.zeros((3, 4)))
    with pytest.raises(StoreError, match="a new cache needs a shape"):
        CacheWriter(tmp_path / "new")


def _rewrite_meta(path, **changes):
    import lmdb

    env = lmdb.open(str(path), max_dbs=4)
    db = env.open_db(DB_META)
    with env.begin(write=True, db=db) as txn:
        meta = json.loads(txn.get(META_KEY))
        meta.update(changes)
        txn.put(META_KEY, json.dumps(meta).encode())
    env.close()


def test_older_schema_and_wrong_size_values_are_refused(tmp_path):
    make_cache(tmp_path / "c", ["a"])
    _rewrite_meta(tmp_path / "c", schema_version=0)
    with pytest.raises(SchemaError, match="cache schema version 0 is not the supported version 1"):
        CacheReader(tmp_path / "c")
    make_cache(tmp_path / "d", ["a"])
    _rewrite_meta(tmp_path / "d", shape=[5, 4])  # values now have the wrong size for the metadata
    with CacheReader(tmp_path / "d") as r:
        with pytest.raises(CorruptValueError, match="value of 48 bytes, expected 40"):
            r["a"]
    assert verify(tmp_path / "d")["bad"][0] == {"id": "a", "reason": "value of 48 bytes, expected 40"}


def test_merge_two_parts(tmp_path):
    a = make_cache(tmp_path / "p0", ["0", "2", "4"], seed=1)
    b = make_cache(tmp_path / "p1", ["1", "3", "4"], seed=2)
    assert merge(tmp_path / "all", [tmp_path / "p0", tmp_path / "p1"]) == {"copied": 5, "skipped": 1}
    with CacheReader(tmp_path / "all") as r:
        assert sorted(r.keys()) == ["0", "1", "2", "3", "4"] and r.meta.producer == {"model": "m"}
        np.testing.assert_allclose(r["3"], b["3"], atol=1e-2)
        np.testing.assert_allclose(r["4"], a["4"], atol=1e-2)  # first part wins, no overwrite
    assert verify(tmp_path / "all")["bad"] == []


def test_merge_refuses_a_corrupt_or_foreign_part_and_writes_nothing(tmp_path):
    make_cache(tmp_path / "dst", ["x"])
    make_cache(tmp_path / "p0", ["a"])
    make_cache(tmp_path / "p1", ["b"])
    corrupt_one_value(tmp_path / "p1", "b")
    with pytest.raises(CorruptValueError, match="id 'b': checksum mismatch"):
        merge(tmp_path / "dst", [tmp_path / "p0", tmp_path / "p1"])
    with CacheWriter(tmp_path / "other", shape=SHAPE, producer={"model": "other"}) as w:
        w.put("c", np.zeros(SHAPE))
    with pytest.raises(MetadataMismatch, match="producer.model: cache has 'other', expected 'm'"):
        merge(tmp_path / "dst", [tmp_path / "p0", tmp_path / "other"])
    with CacheReader(tmp_path / "dst") as r:
        assert list(r.keys()) == ["x"]


def test_export_is_readable_by_webdataset(tmp_path):
    import webdataset as wds

    ids = ["0", "a.b", "ü"] + [str(i) for i in range(10, 17)]
    values = make_cache(tmp_path / "c", ids)
    out = export(tmp_path / "c", str(tmp_path / "sh" / "e-%04d.tar"), maxcount=4)
    assert out["count"] == 10 and len(out["shards"]) == 3
    assert not list((tmp_path / "sh").glob("*.tmp"))
    ds = wds.WebDataset([str(s) for s in out["shards"]], shardshuffle=False).decode().to_tuple("id.txt", "npy")
    got = {i: a for i, a in ds}
    assert sorted(got) == sorted(ids)
    for i in ids:
        assert got[i].shape == SHAPE and got[i].dtype == np.float16
        np.testing.assert_allclose(got[i], values[i], atol=1e-2)


def test_shard_writer_exception_leaves_the_unfinished_shard_as_tmp_quietly(tmp_path, monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # e.g. "write to closed file" in GC
    with pytest.raises(RuntimeError, match="disk on fire"):
        with AtomicShardWriter(str(tmp_path / "s-%04d.tar"), maxcount=2) as sink:
            for i in range(3):
                sink.write({"__key__": str(i), "txt": b"x"})
            raise RuntimeError("disk on fire")
    del sink
    gc.collect()
    assert [u.exc_value for u in unraisable] == []
    assert sorted(os.listdir(tmp_path)) == ["s-0000.tar", "s-0001.tar.tmp"]  # never renamed
    with tarfile.open(tmp_path / "s-0001.tar.tmp") as t:
        assert t.getnames() == ["2.txt"]


def test_shard_members_have_mtime_0_and_no_pax_headers(tmp_path):
    with AtomicShardWriter(str(tmp_path / "s-%04d.tar")) as sink:
        sink.write({"__key__": "0", "txt": b"x"})
    raw = (tmp_path / "s-0000.tar").read_bytes()
    assert raw[156:157] == b"0" and raw[512:513] == b"x"  # a plain file header, then the data
    with tarfile.open(tmp_path / "s-0000.tar") as t:
        assert [(m.name, m.mtime, m.pax_headers) for m in t.getmembers()] == [("0.txt", 0, {})]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_get_batch_copies_each_value_into_one_array(tmp_path, dtype):
    values = make_cache(tmp_path / "c", ["a", "b", "c"], dtype=dtype)
    with CacheReader(tmp_path / "c") as r:
        batch = r.get_batch(["c", "a", "c"])
        assert batch.shape == (3, *SHAPE) and batch.flags.c_contiguous
        got = torch.from_numpy(batch).view(torch.bfloat16).float() if dtype == "bfloat16" else batch
        for row, i in zip(got, ["c", "a", "c"]):
            np.testing.assert_array_equal(np.asarray(row, dtype=np.float32), r["a" if i == "a" else "c"])
        np.testing.assert_allclose(np.asarray(got[1], dtype=np.float32), values["a"], rtol=1e-2, atol=1e-2)
        out = np.empty_like(batch)
        assert r.get_batch(["c", "a", "c"], out=out) is out and np.array_equal(out, batch)
        with pytest.raises(StoreError, match=r"C-contiguous \w+ array of shape \(2, "):
            r.get_batch(["a", "b"], out=np.empty((2, *SHAPE), batch.dtype)[:, ::-1])
        other = {np.dtype(np.float16): np.int16, np.dtype(np.int16): np.float16, np.dtype(np.float32): np.int32}
        with pytest.raises(StoreError, match="C-contiguous"):  # the right size in bytes, but another dtype
            r.get_batch(["a", "b"], out=np.empty((2, *SHAPE), other[batch.dtype]))
        with pytest.raises(MissingIdError, match=r"^id 'zz' is not in cache"):
            r.get_batch(["a", "zz"])
        assert r.get_batch([]).shape == (0, *SHAPE)
