"""The `store` CLI: exact exit codes and messages; read-only commands leave the files unchanged."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_store import SHAPE, corrupt_one_value, make_cache

from store import CacheReader, CacheWriter
from store.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def digest(path):
    return hashlib.sha256((path / "data.mdb").read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path):
    make_cache(tmp_path / "c", ["0", "1", "ü"])
    return tmp_path / "c"


def test_read_only_commands_leave_the_data_file_unchanged(cache, tmp_path):
    before = digest(cache)
    (tmp_path / "ids.txt").write_text("0\n7\nü\n")
    for args in (["info", cache], ["info", cache, "--json"], ["ls", cache], ["get", cache, "0"],
                 ["verify", cache], ["missing", cache, "--ids", tmp_path / "ids.txt"],
                 ["export", cache, tmp_path / "x-%03d.tar"]):
        assert run(*args).exit_code == 0, args
    assert digest(cache) == before


def test_info(cache):
    r = run("info", cache, "--json")
    d = json.loads(r.output)
    assert (d["count"], d["shape"], d["dtype"], d["bytes_per_value"]) == (3, [6, 4], "float16", 48)
    assert d["producer"] == {"model": "m"} and d["size_on_disk"] > 0
    text = run("info", cache).output
    assert "entries          3\n" in text and "producer.model   m\n" in text


def test_ls_and_limit(cache):
    assert run("ls", cache).output == "0\n1\nü\n"
    assert run("ls", cache, "--limit", "2").output == "0\n1\n"
    assert json.loads(run("ls", cache, "--json").output) == ["0", "1", "ü"]


def test_get_stats_and_npy(cache, tmp_path):
    r = run("get", cache, "1", "--npy", tmp_path / "one.npy", "--json")
    d = json.loads(r.output)
    with CacheReader(cache) as reader:
        value = reader["1"].astype(np.float64)
    saved = np.load(tmp_path / "one.npy", allow_pickle=False)
    np.testing.assert_array_equal(saved, reader_value := value.astype(np.float16))
    assert reader_value.shape == SHAPE
    assert d["shape"] == [6, 4] and d["nan"] == 0 and d["inf"] == 0
    assert d["mean"] == pytest.approx(value.mean()) and d["l2_norm"] == pytest.approx(np.linalg.norm(value))


def test_verify_exit_codes(cache):
    r = run("verify", cache)
    assert r.exit_code == 0 and r.output == "checked 3 entries: 0 bad\n"
    corrupt_one_value(cache, "1")
    r = run("verify", cache)
    assert r.exit_code == 1
    assert r.output == "1\tchecksum mismatch (value corrupted)\nchecked 3 entries: 1 bad\n"
    d = json.loads(run("verify", cache, "--json").output)
    assert d["bad"] == [{"id": "1", "reason": "checksum mismatch (value corrupted)"}]


def test_missing(cache, tmp_path):
    (tmp_path / "ids.txt").write_text("0\t/some/path.jpg\n7\nü\n\n8\n")
    r = run("missing", cache, "--ids", tmp_path / "ids.txt")
    assert r.exit_code == 0 and r.stdout == "7\n8\n" and "2 of 4 ids missing" in r.stderr


def test_merge_and_export(cache, tmp_path):
    make_cache(tmp_path / "p1", ["5", "6"], seed=3)
    r = run("merge", tmp_path / "all", cache, tmp_path / "p1", "--json")
    assert r.exit_code == 0 and json.loads(r.output) == {"copied": 5, "skipped": 0}
    r = run("export", tmp_path / "all", tmp_path / "sh" / "e-%03d.tar", "--maxcount", "2", "--json")
    assert json.loads(r.output)["count"] == 5 and len(list((tmp_path / "sh").glob("*.tar"))) == 3


@pytest.mark.parametrize("setup, args, message", [
    (None, ["info", "{p}/nope"], "Error: {p}/nope does not exist\n"),
    ("dir", ["ls", "{p}/dir"], "Error: {p}/dir is not a cache (no data.mdb)\n"),
    ("lmdb", ["info", "{p}/lmdb"], "Error: {p}/lmdb is an LMDB environment but not a cache (no metadata record)\n"),
    ("cache", ["get", "{p}/c", "42"], "Error: id '42' is not in cache {p}/c\n"),
    ("empty", ["verify", "{p}/e"], "Error: {p}/e: the cache is empty, nothing to verify\n"),
    ("empty", ["export", "{p}/e", "{p}/o-%d.tar"], "Error: {p}/e: the cache is empty, nothing to export\n"),
    ("cache", ["export", "{p}/c", "{p}/out.tar"],
     "Error: {p}/out.tar: the output pattern needs a shard number, e.g. out-%06d.tar\n"),
    ("foreign", ["merge", "{p}/c", "{p}/f"],
     "Error: cache {p}/f was built with other settings:\n  producer.model: cache has 'other', expected 'm'\n"),
])
def test_bad_input_exits_1_with_one_message(tmp_path, setup, args, message):
    import lmdb

    if setup == "dir":
        (tmp_path / "dir").mkdir()
    if setup == "lmdb":
        lmdb.open(str(tmp_path / "lmdb")).close()
    if setup in ("cache", "foreign"):
        make_cache(tmp_path / "c", ["0"])
    if setup == "empty":
        CacheWriter(tmp_path / "e", shape=SHAPE).close()
    if setup == "foreign":
        with CacheWriter(tmp_path / "f", shape=SHAPE, producer={"model": "other"}) as w:
            w.put("9", np.zeros(SHAPE))
    r = CliRunner().invoke(cli, [a.format(p=tmp_path) for a in args])
    assert r.exit_code == 1
    assert r.output == message.format(p=tmp_path)
    assert r.exception is None or isinstance(r.exception, SystemExit)  # no traceback


def test_every_command_help_has_an_example():
    for name in ["info", "ls", "get", "verify", "missing", "merge", "export"]:
        r = run(name, "--help")
        assert r.exit_code == 0 and "Example:" in r.output, name


def test_console_script_runs_as_a_user_runs_it(cache):
    exe = shutil.which("store", path=str(Path(sys.executable).parent)) or shutil.which("store")
    assert exe, "the store console script is not installed (pip install -e .)"
    p = subprocess.run([exe, "get", str(cache), "nope"], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr == f"Error: id 'nope' is not in cache {cache}\n"
    assert "Traceback" not in p.stderr
