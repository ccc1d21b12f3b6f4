"""Shards that carry the embeddings (``vqa-data shards --inline``) and shards read from URLs: real
shards, real LMDB caches, a real HTTP server on localhost, the real CLIs."""

import functools
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_stream import SHAPE, make_cache, make_records, value_of

from pipelines.cli.data import cli as data_cli
from pipelines.cli.train import main as train_main
from pipelines.data.inline import INLINE, manifest_entry
from pipelines.data.remote import open_url
from pipelines.data.shards import read_manifest, shard_paths, write_shards
from pipelines.data.stream import (
    StreamConfig,
    eval_loader,
    open_caches,
    read_records,
    train_loader,
)
from pipelines.errors import PipelineError
from store import CacheReader, MetadataMismatch


@pytest.fixture
def inline_shards(tmp_path):
    """40 images' examples in shards carrying image (float16) and audio (bfloat16) values inline, and
    the manifest entry naming both caches."""
    records = make_records(40)
    make_cache(tmp_path / "image", sorted({r["vectors"]["image"] for r in records}))
    make_cache(tmp_path / "audio", sorted({r["vectors"]["audio"] for r in records}), shape=(4, 8), dtype="bfloat16")
    readers = {"image": CacheReader(tmp_path / "image"), "audio": CacheReader(tmp_path / "audio")}
    shards = write_shards(records, tmp_path / "qa" / "train-%06d.tar", min_shards=4, inline=readers)
    return records, shards, manifest_entry(readers)


def inline_config(shards, entry, **kw):
    kw = {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 50, **kw}
    return StreamConfig(shards=shards, caches={"image": INLINE, "audio": INLINE}, inline=entry, **kw)


def check_batches(loader, by_id) -> list:
    seen = []
    for b in loader:
        for name, shape, dtype in (("image", SHAPE, torch.float16), ("audio", (4, 8), torch.bfloat16)):
            values = b["vectors"][name]
            assert values.shape == (len(b["id"]), *shape) and values.dtype == dtype
            assert b["ids"][name] == [by_id[i]["vectors"][name] for i in b["id"]]  # each example's own id
            assert values[:, 0, 0].float().tolist() == [value_of(x) for x in b["ids"][name]]  # its own values
        assert "inline" not in b
        seen += b["id"]
    return seen


def test_inline_values_stream_with_each_example_once_in_train_and_eval(inline_shards):
    """The values come from the shards (no cache is opened: the caches could be gone), each
    example with its own image's and its own audio clip's values (7 clips shared by 40 images: a
    sample carries each distinct clip once), every example once per epoch with 2 workers."""
    records, shards, entry = inline_shards
    by_id = {r["id"]: r for r in records}
    for name in ("image", "audio"):
        for p in Path(entry[name]["cache"]).iterdir():
            p.unlink()
    seen = check_batches(train_loader(inline_config(shards, entry, num_workers=2)), by_id)
    assert sorted(seen) == sorted(by_id)
    assert check_batches(eval_loader(inline_config(shards, entry), 0, 1), by_id) == [r["id"] for r in records]


def test_inline_members_are_raw_npy_and_pickles_are_refused(inline_shards, tmp_path):
    """Each sample holds its JSON and one .npy per field (image: one row, the sample's image; audio:
    its distinct clips); a .npy holding an object array (a pickle) is refused, never loaded."""
    records, shards, _ = inline_shards
    with tarfile.open(shards[0]) as t:
        first = sorted(n for n in t.getnames() if n.startswith("000000000."))
        assert first == ["000000000.audio.npy", "000000000.image.npy", "000000000.json"]
        image = np.load(io.BytesIO(t.extractfile(first[1]).read()), allow_pickle=False)
        assert image.shape == (1, *SHAPE) and image.dtype == np.float16
        assert np.load(io.BytesIO(t.extractfile(first[0]).read()), allow_pickle=False).dtype == np.int16  # bfloat16 bits
    evil = tmp_path / "evil-000000.tar"
    payloads = {"0.json": json.dumps(records[:1]).encode()}
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    payloads["0.image.npy"] = buf.getvalue()
    with tarfile.open(evil, "w") as t:
        for name, data in payloads.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(PipelineError, match=rf"^{evil}: sample 0: image.npy: not a raw .npy array \(Object arrays "
                                            "cannot be loaded when allow_pickle=False"):
        read_records([str(evil)], inline=["image"])
    assert read_records([str(evil)]) == records[:1]  # a run that joins the LMDB cache never reads it


def test_a_field_not_inline_is_named(inline_shards, tmp_path):
    records, shards, entry = inline_shards
    with pytest.raises(ValueError, match=r"^--cache audio=inline: the shards carry no audio values \(write them "
                                         r"with `vqa-data shards --inline audio=CACHE`"):
        inline_config(shards, {"image": entry["image"]})
    plain = write_shards(records, tmp_path / "plain" / "train-%06d.tar")
    cfg = StreamConfig(shards=plain, caches={"image": INLINE}, inline={"image": entry["image"]}, batch_size=4,
                       num_workers=0)
    with pytest.raises(PipelineError, match=r"example 0: its shard carries no inline 'image' values"):
        next(iter(eval_loader(cfg, 0, 1)))  # fixed order: example 0 first


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """An HTTP server on localhost serving ``tmp_path``; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_shards_stream_from_a_url_and_pipe_or_secured_local_paths_are_refused(inline_shards, tmp_path, http_root,
                                                                              monkeypatch):
    """The manifest and the shards of a folder served over HTTP: the same examples and values as read
    from disk. ``pipe:`` is never run; with WDS_SECURE local files are refused as webdataset refuses them."""
    records, shards, entry = inline_shards
    (tmp_path / "qa" / "manifest.json").write_text(json.dumps(
        {"format": "where-to-fuse/qa-shards", "version": 3, "inline": entry,
         "train": {"shards": [Path(s).name for s in shards]}}))
    url = f"{http_root}/qa"
    assert read_manifest(url)["inline"] == entry
    remote = shard_paths(url, "train")
    assert remote == [f"{url}/{Path(s).name}" for s in shards]
    seen = check_batches(train_loader(inline_config(remote, read_manifest(url)["inline"], num_workers=2)),
                         {r["id"]: r for r in records})
    assert sorted(seen) == sorted(r["id"] for r in records)
    with pytest.raises(PipelineError, match=rf"^{http_root}/nope/manifest.json: cannot read it \(curl exit 22: HTTP "
                                            r"error \(not found\?\)\)$"):
        read_manifest(f"{http_root}/nope")
    # curl's 404 is seen when it exits before the tar is read, else as an empty tar: a race, both named
    with pytest.raises(PipelineError, match=rf"^{url}/gone-000000.tar: cannot read the shard \((empty file|curl "
                                            r"exit 22: HTTP error \(not found\?\))\)$"):
        read_records([f"{url}/gone-000000.tar"])
    with pytest.raises(PipelineError, match=r"^--shards pipe:touch x: pipe: URLs run a shell command and are not read"):
        open_url("pipe:touch x")
    with pytest.raises(PipelineError, match=r"^--shards pipe:cat /x/manifest.json: pipe: URLs"):
        read_manifest("pipe:cat /x")
    monkeypatch.setattr("webdataset.utils.enforce_security", True)
    with pytest.raises(PipelineError, match=r"^--shards .*train-000000.tar: WDS_SECURE=1 forbids local files"):
        read_records(shards)
    assert len(read_records(remote)) == len(records)  # remote shards still open


def invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_fuse_train_on_inline_shards_trains_exactly_as_on_the_lmdb_join(vqa_data, tmp_path):
    """``vqa-data shards --inline image=CACHE`` then ``fuse-train`` without --cache: the same weights, bit
    for bit, as the same run joining the LMDB cache; the cache's fingerprint travels in the manifest and
    is checked as a cache's is; a cache lacking ids or a field the data lacks stop it before it writes."""
    data = vqa_data(60, 3)
    r = invoke(data_cli, "shards", data / "shapes", tmp_path / "plain", "--shard-size", "60")
    assert r.exit_code == 0, r.output
    r = invoke(data_cli, "shards", data / "shapes", tmp_path / "inline", "--shard-size", "60", "--inline",
               f"image={data / 'cache'}")
    assert r.exit_code == 0, r.output
    assert r.output.rstrip().endswith("metric: vqa; inline: image)")
    inline = read_manifest(tmp_path / "inline")["inline"]["image"]
    with CacheReader(data / "cache") as cache:
        assert inline == {"cache": str((data / "cache").resolve()), "meta": json.loads(cache.meta.to_json())}
    base = ["--t5", "tiny", "--tokenizer", "words", "--fuse", "0:question 1:image", "--steps", "4", "--eval-every",
            "4", "--batch-size", "16", "--eval-limit", "32", "--num-workers", "0", "--warmup", "0"]
    r = invoke(train_main, *base, "--shards", tmp_path / "plain", "--cache", f"image={data / 'cache'}",
               "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    r = invoke(train_main, *base, "--shards", tmp_path / "inline", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    a, b = (load_file(str(tmp_path / run / "checkpoints" / "last" / "model.safetensors")) for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["caches"] == {"image": INLINE}
    # the fingerprint: a model expecting another shape is refused, naming the shards and the field
    (tmp_path / "expect.json").write_text(json.dumps({"expect": {"image": {"shape": [196, 768]}}}))
    r = invoke(train_main, *base, "--shards", tmp_path / "inline", "--config", tmp_path / "expect.json",
               "--out", tmp_path / "c")
    assert r.exit_code == 1
    assert f"cache {tmp_path / 'inline'} (inline, from {data / 'cache'}) was built with other settings" in r.output
    assert "shape: cache has [9, 192], expected [196, 768]" in r.output
    # a cache lacking ids: nothing written; a field the data lacks: a usage error
    make_cache(tmp_path / "few", ["1", "2"], shape=(9, 192))
    r = invoke(data_cli, "shards", data / "shapes", tmp_path / "d", "--inline", f"image={tmp_path / 'few'}")
    assert r.exit_code == 1 and "cache image" in r.output and "lacks 58 of 60 ids" in r.output
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
    r = invoke(data_cli, "shards", data / "shapes", tmp_path / "e", "--inline", f"audio={data / 'cache'}")
    assert r.exit_code == 2
    assert r.output.endswith("Error: --inline audio=CACHE: the data has no vector field 'audio' (vector fields: "
                             "image)\n")
    cfg = StreamConfig(shards=shard_paths(tmp_path / "inline", "train"), caches={"image": INLINE},
                       inline={"image": inline}, expect={"image": {"dtype": "float32"}})
    with pytest.raises(MetadataMismatch, match=r"dtype: cache has 'float16', expected 'float32'"):
        open_caches(cfg)
