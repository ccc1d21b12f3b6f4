"""The stream's own tar reader reads shards as webdataset does, and refuses damaged ones."""

import gzip
import io
import json
import tarfile

import pytest
import webdataset as wds

from pipelines.errors import PipelineError
from pipelines.shards import write_shards
from pipelines.stream import parse_record, read_records, read_shard, shard_samples

RECORD = {"question_id": 7, "image_id": "3", "question": "What?", "answers": ["a"] * 10,
          "answer_type": "other"}


def add(t, name, payload=b"", kind=tarfile.REGTYPE, **attrs):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(payload)
    for key, value in attrs.items():
        setattr(info, key, value)
    t.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)


def flavours(path, fmt):
    """A tar of every kind of entry webdataset meets: nested keys, long and non-ASCII names, a
    float mtime (a PAX header in PAX format), upper-case extensions, metadata, folders, links."""
    with tarfile.open(path, "w", format=fmt) as t:
        add(t, "a/b/s1.json", b'{"x": 1}')
        add(t, "a/b/s1.txt", b"one")
        add(t, "d" * 120 + "/s2.json", b"[2]")  # over 100 bytes: ustar prefix / GNU / PAX name
        add(t, "s3.JSON", b"3", mtime=1234.5)
        add(t, "s3.seg.cls", b"three")
        add(t, "__meta__", b"skipped")
        add(t, "__dir__/s9.json", b"skipped")
        add(t, "README", b"no extension: skipped")
        add(t, "folder", kind=tarfile.DIRTYPE)
        add(t, "link.json", kind=tarfile.SYMTYPE, linkname="s3.JSON")
        add(t, "v1.0/s4.json", b"4")
        if fmt != tarfile.USTAR_FORMAT:  # ustar cannot hold these
            add(t, "ü/é.json", b'"five"')
            add(t, "e" * 300 + ".json", b"6")


def webdataset_samples(path):
    return list(wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()))


def own_samples(path):
    return list(shard_samples(read_shard(str(path)), str(path)))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_samples_are_those_webdataset_reads(tmp_path, fmt):
    path = tmp_path / "s.tar"
    flavours(path, fmt)
    ours = own_samples(path)
    assert ours == webdataset_samples(path)
    assert [s["__key__"] for s in ours][:3] == ["a/b/s1", "d" * 120 + "/s2", "s3"]
    assert ours[2] == {"__key__": "s3", "__url__": str(path), "json": b"3", "seg.cls": b"three"}
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [{**s, "__url__": None} for s in own_samples(gz)] == [{**s, "__url__": None} for s in ours]


def test_shards_written_by_the_pipeline_read_back(tmp_path):
    records = [{**RECORD, "question_id": i, "question": f"q{i} ✓"} for i in range(30)]
    paths = write_shards(records, tmp_path / "t-%06d.tar", shard_size=7)
    assert read_records(paths) == records
    for p in paths:
        assert own_samples(p) == webdataset_samples(p)


def test_a_damaged_shard_is_refused_with_its_name(tmp_path):
    write_shards([RECORD, {**RECORD, "question_id": 8}], str(tmp_path / "good%d.tar"))
    good = tmp_path / "good0.tar"
    raw = good.read_bytes()
    flipped = tmp_path / "flipped.tar"
    flipped.write_bytes(raw[:20] + b"X" + raw[21:])  # a byte of the first member's name
    with pytest.raises(PipelineError, match=r"flipped.tar: not a tar archive, or damaged \(header checksum"):
        own_samples(flipped)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:512 + 100])  # the first member's data is cut short
    with pytest.raises(PipelineError, match=r"cut.tar: truncated \(a member at byte 0 runs past the end\)"):
        own_samples(cut)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello " * 200)
    with pytest.raises(PipelineError, match="junk.tar: not a tar archive, or damaged"):
        own_samples(junk)
    dup = tmp_path / "dup.tar"
    with tarfile.open(dup, "w") as t:
        add(t, "k.json", b"{}")
        add(t, "k.json", b"{}")
    with pytest.raises(PipelineError, match="dup.tar: k.json appears twice"):
        own_samples(dup)


def test_the_json_member_is_decoded_strictly(tmp_path):
    sample = {"__key__": "7", "__url__": "u.tar"}
    assert parse_record({**sample, "json": json.dumps(RECORD).encode()}) == RECORD
    assert parse_record({**sample, "json": b"\n " + json.dumps(RECORD).encode() + b" \n"}) == RECORD
    for payload, why in ((b'{"question_id": 7', "the json member is not JSON"),
                         (json.dumps(RECORD).encode() + b' {"x": 1}', "the json member is not JSON"),
                         (b"\xff\xfe", "the json member is not JSON"),
                         (b"[1, 2]", "no JSON record"),
                         (b'{"question_id": 7}', "record has no image_id")):
        with pytest.raises(PipelineError, match=f"^u.tar: sample 7: {why}"):
            parse_record({**sample, "json": payload})
    with pytest.raises(PipelineError, match="^u.tar: sample 7: no JSON record"):
        parse_record({**sample, "txt": b"x"})
