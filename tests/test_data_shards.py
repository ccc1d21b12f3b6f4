"""QA shards (complete or absent, never half-written), the shard folder's manifest, the vqa-data CLI."""

import gc
import json
import os
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.cli.data import cli
from pipelines.data.shapes import write_shapes
from pipelines.data.shards import (
    read_manifest,
    selection_side,
    shard_paths,
    write_qa_shards,
    write_shards,
)
from pipelines.data.stream import read_records
from pipelines.data.vqa import annotations_path, read_split
from pipelines.errors import DatasetExistsError, PipelineError
from store import CacheWriter
from test_data_vqa import write_vqa


def records(n):
    """Example dicts (:mod:`pipelines.data.example`), 5 per image."""
    return [{"id": i, "texts": {"question": f"q{i}?"}, "vectors": {"image": str(i // 5)}, "target": "yes",
             "references": ["yes"] * 10, "groups": {"answer_type": "yes/no"}, "split": "train"} for i in range(n)]


def on_image(record, image_id):
    return {**record, "vectors": {"image": str(image_id)}}


class Poison:
    """A record that fails when the writer converts it to a dict."""

    def keys(self):
        raise RuntimeError("disk on fire")


def test_shards_hold_one_json_list_per_image(tmp_path):
    paths = write_shards(records(25), tmp_path / "s-%06d.tar", shard_size=10)
    assert [os.path.basename(p) for p in paths] == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    with tarfile.open(paths[0]) as t:
        assert t.getnames() == ["000000000.json", "000000001.json"]  # images 0 and 1, 5 questions each
        group = json.loads(t.extractfile("000000001.json").read())
        assert [r["id"] for r in group] == [5, 6, 7, 8, 9] and group[0]["texts"]["question"] == "q5?"
        assert group[0] == records(6)[5]  # the example dict as given, as JSON
    assert [r["id"] for r in read_records(paths)] == list(range(25))
    # at least min_shards shards when there are enough images, for nodes x workers
    one_each = [on_image(r, r["id"]) for r in records(16)]
    assert len(write_shards(one_each, tmp_path / "m-%06d.tar", shard_size=1000, min_shards=8)) == 8
    # ... but an image's questions stay whole for it: images 0, 1, 2 (5 questions each) and 3 (1)
    paths = write_shards(records(16), tmp_path / "n-%06d.tar", shard_size=1000, min_shards=8)
    assert [len(read_records([p])) for p in paths] == [5, 5, 5, 1]


def test_a_small_side_is_filled_not_cut_into_min_shards(tmp_path):
    """A one-image train side (the issue: 14 questions) used to become 7 shards of 2 questions: min_shards
    cut the image's run of records. Only a full shard (shard_size) cuts an image now."""
    one_image = [on_image(r, 7) for r in records(14)]
    paths = write_shards(one_image, tmp_path / "s-%06d.tar", shard_size=1000, min_shards=8)
    assert len(paths) == 1 and len(read_records(paths)) == 14
    with tarfile.open(paths[0]) as t:
        assert len(t.getnames()) == 1  # one sample: the image's 14 questions
    # 20 images of 5 questions, 8 shards asked: 8 shards of whole images, 2 or 3 images each
    paths = write_shards(records(100), tmp_path / "m-%06d.tar", shard_size=1000, min_shards=8)
    assert [len(read_records([p])) for p in paths] == [15, 10, 15, 10, 15, 10, 15, 10]


def test_an_image_is_cut_where_a_shard_is_full_and_scattered_records_still_stream(tmp_path):
    recs = [on_image(r, 7) for r in records(12)]  # one image, 12 questions
    recs += [{**on_image(r, 8 if k % 2 else 9), "id": 100 + k} for k, r in enumerate(records(4))]
    paths = write_shards(recs, tmp_path / "s-%06d.tar", shard_size=5)
    sizes = [[len(json.loads(t.extractfile(m).read())) for m in t.getmembers()]
             for t in map(tarfile.open, paths)]
    assert sizes == [[5], [5], [2, 1, 1, 1], [1]]  # at most 5 records a shard; ids 9, 8, 9, 8 alternate
    assert [r["id"] for r in read_records(paths)] == [r["id"] for r in recs]


def test_an_exception_mid_write_leaves_only_whole_shards(tmp_path):
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(records(15) + [Poison()], tmp_path / "s-%06d.tar", shard_size=10)
    gc.collect()
    assert sorted(os.listdir(tmp_path)) == ["s-000000.tar", "s-000001.tar.tmp"]
    assert len(read_records([str(tmp_path / "s-000000.tar")])) == 10


def test_a_killed_writer_leaves_only_whole_shards(tmp_path):
    code = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1])\n"
        "from pipelines.data.shards import write_shards\n"
        "class Kill:\n"
        "    def keys(self): os.kill(os.getpid(), signal.SIGKILL)\n"
        "recs = [{'id': i, 'texts': {'question': 'q'}, 'vectors': {'image': '1'}, 'target': 'a',\n"
        "         'references': ['a'] * 10, 'groups': {'answer_type': 'other'}} for i in range(15)] + [Kill()]\n"
        "write_shards(recs, sys.argv[2] + '/s-%06d.tar', shard_size=10)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code, root, str(tmp_path)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert sorted(os.listdir(tmp_path)) == ["s-000000.tar", "s-000001.tar.tmp"]
    assert len(read_records([str(tmp_path / "s-000000.tar")])) == 10


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, images=50, seed=0, size=32)
    return root


def test_qa_shards_split_and_manifest(shapes_dir, tmp_path):
    m = write_qa_shards(shapes_dir, tmp_path / "qa", seed=0)
    assert m["train"]["count"] == 200 and m["eval"]["count"] == 50
    assert m["train"]["images"] == 40 and m["eval"]["images"] == 10
    assert len(m["train"]["shards"]) == 8
    assert read_manifest(tmp_path / "qa") == m
    # the fields the examples hold and the metric, for fuse-train to check --fuse against
    assert (m["layout"], m["fields"], m["metric"]) == ("vqa-v2", {"texts": ["question"], "vectors": ["image"]}, "vqa")
    # the thesis' pooled 80/20 split stays the default: no select side, the checkpoint is picked on eval
    assert (m["eval_fraction"], m["select_fraction"], m["train_splits"], m["eval_splits"]) == (0.2, None, None, None)
    assert "select" not in m and selection_side(tmp_path / "qa") == "eval"
    with pytest.raises(PipelineError, match=r"manifest.json: no select side \(`vqa-data shards` writes one with "
                                            r"--select-fraction\)"):
        shard_paths(tmp_path / "qa", "select")
    train = read_records(shard_paths(tmp_path / "qa", "train"))
    evals = read_records(shard_paths(tmp_path / "qa", "eval"))
    assert len(train) == 200 and not {r["vectors"]["image"] for r in train} & {r["vectors"]["image"] for r in evals}
    with pytest.raises(DatasetExistsError, match="already holds shards"):
        write_qa_shards(shapes_dir, tmp_path / "qa")
    os.remove(tmp_path / "qa" / "eval-000001.tar")
    with pytest.raises(PipelineError, match=r"eval-000001.tar: shard listed in .*manifest.json is missing"):
        shard_paths(tmp_path / "qa", "eval")
    with pytest.raises(PipelineError, match="vqa-data shards` did not finish"):
        shard_paths(tmp_path, "train")
    (tmp_path / "qa" / "manifest.json").write_text(json.dumps({**m, "version": 1}))
    with pytest.raises(PipelineError, match=r"manifest.json: shards of format version 1, this version reads 3: "
                                            "write them again with `vqa-data shards`"):
        shard_paths(tmp_path / "qa", "train")


def vqa_v2_folder(root):
    """VQA v2 as it comes: the JSON files in vqa/ (train: images 1..10, val: 101..104, 2 questions each;
    test-dev without annotations), the images apart in coco/."""
    write_vqa(root / "vqa", "train", images=range(1, 11))
    write_vqa(root / "vqa", "val", images=range(101, 105))
    write_vqa(root / "vqa", "test-dev", images=range(201, 203))
    annotations_path(root / "vqa", "test-dev").unlink()
    (root / "coco").mkdir()
    for folder in ("train2014", "val2014", "test2015"):
        (root / "vqa" / folder).rename(root / "coco" / folder)
    return root / "vqa", root / "coco"


def test_vqa_v2_protocol_train_on_train_select_on_a_slice_of_it_score_all_of_val(tmp_path):
    vqa, coco = vqa_v2_folder(tmp_path)
    m = write_qa_shards(vqa, tmp_path / "qa", train_splits=["train"], eval_splits=["val"], select_fraction=0.2,
                        images_root=coco, min_shards=2)
    sides = {side: read_records(shard_paths(tmp_path / "qa", side)) for side in ("train", "select", "eval")}
    val = [r.to_example().to_dict() for r in read_split(vqa, "val", check_images=False)]
    assert sides["eval"] == val  # all of val, in its file order: no image of it left on the train side
    train = [r.to_example().to_dict() for r in read_split(vqa, "train", check_images=False)]
    assert sorted(sides["train"] + sides["select"], key=lambda r: r["id"]) == train
    assert len({r["vectors"]["image"] for r in sides["select"]}) == 2  # 20% of the 10 train images
    assert not {r["vectors"]["image"] for r in sides["select"]} & {r["vectors"]["image"] for r in sides["train"]}
    assert {k: m[k] for k in ("splits", "train_splits", "eval_splits", "eval_fraction", "select_fraction",
                              "images_root")} == {
        "splits": ["train", "val"], "train_splits": ["train"], "eval_splits": ["val"], "eval_fraction": None,
        "select_fraction": 0.2, "images_root": str(coco.resolve())}
    assert [m[side]["count"] for side in ("train", "select", "eval")] == [16, 4, 8]
    assert selection_side(tmp_path / "qa") == "select"
    # --eval-splits alone: the train side is every other split with annotations (test-dev has none)
    m = write_qa_shards(vqa, tmp_path / "qa2", eval_splits=["val"], images_root=coco)
    assert m["train_splits"] == ["train"] and "select" not in m and m["eval"]["count"] == 8
    # a select side out of a pooled split too
    m = write_qa_shards(vqa, tmp_path / "qa3", splits=["train", "val"], select_fraction=0.25, images_root=coco)
    assert [m[side]["images"] for side in ("train", "select", "eval")] == [8, 3, 3]


# ---- the CLI ----------------------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_shapes_shards_check(tmp_path):
    r = run("shapes", tmp_path / "shapes", "--images", 30, "--seed", 1, "--size", 32)
    assert r.exit_code == 0, r.output
    assert "wrote 30 images, 150 questions" in r.output and "question-only baseline" in r.output
    r = run("shards", tmp_path / "shapes", tmp_path / "qa", "--split-by", "question", "--seed", 2)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("train: 120 questions, ") and "eval: 30 questions" in r.output
    ids = {rec["vectors"]["image"] for side in ("train", "eval")
           for rec in read_records(shard_paths(tmp_path / "qa", side))}
    with CacheWriter(tmp_path / "cache", shape=(4, 8)) as w:
        for i in sorted(ids)[:-2]:
            w.put(i, np.zeros((4, 8)))
    r = run("check", tmp_path / "qa", "--cache", f"image={tmp_path / 'cache'}")
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: cache image ({tmp_path / 'cache'}) lacks ")
    assert "(--allow-missing)" in r.output and len(r.output.strip().splitlines()) == 1
    del r  # its traceback (a reference cycle) holds the cache's reader, and LMDB allows one open
    gc.collect()  # environment per file per process: let it go before writing
    with CacheWriter(tmp_path / "cache") as w:
        for i in sorted(ids)[-2:]:
            w.put(i, np.zeros((4, 8)))
    r = run("check", tmp_path / "qa", "--cache", f"image={tmp_path / 'cache'}")
    assert r.exit_code == 0 and r.output.startswith("ok: every id of 120 train and 30 eval records")
    r = run("check", tmp_path / "qa", "--cache", f"image={tmp_path / 'cache'}",
            "--expect", '{"image": {"shape": [196, 768]}}')
    assert r.exit_code == 1
    assert r.output == (f"Error: cache {tmp_path / 'cache'} was built with other settings:\n"
                        "  shape: cache has [4, 8], expected [196, 768]\n")


def test_cli_bad_input_is_one_line_exit_1(tmp_path):
    r = run("shards", tmp_path / "nowhere", tmp_path / "qa")
    assert (r.exit_code, r.output) == (1, f"Error: {tmp_path / 'nowhere'}: no such folder\n")
    (tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json").write_text("[]")
    r = run("shards", tmp_path, tmp_path / "qa")
    assert r.exit_code == 1
    assert r.output == (f"Error: {tmp_path / 'v2_OpenEnded_mscoco_train2014_questions.json'}: top level: "
                        "expected an object with a 'questions' list\n")
    r = run("check", tmp_path, "--cache", "image")
    assert r.exit_code == 2 and "Error: --cache image: expected FIELD=PATH, e.g. --cache image=runs/cache\n" in r.output
    r = run("shapes", tmp_path / "s", "--images", 0)
    assert r.exit_code == 2


def test_cli_vqa_v2_protocol_flags(tmp_path):
    vqa, coco = vqa_v2_folder(tmp_path)
    out = tmp_path / "qa"
    protocol = ("shards", vqa, out, "--train-splits", "train", "--eval-splits", "val", "--select-fraction", 0.2)
    r = run(*protocol)
    assert r.exit_code == 1 and r.output == (
        f"Error: {vqa / 'train2014'}: no such image folder (needed by v2_OpenEnded_mscoco_train2014_questions.json): "
        "give the folder that holds train2014/ with --images-root, or skip the image check with --no-check-images\n")
    r = run(*protocol, "--images-root", coco)
    assert r.exit_code == 0, r.output
    assert r.output == ("train: 16 questions, 8 images, 8 shards; select: 4 questions, 2 images, 2 shards; "
                        f"eval: 8 questions, 4 images, 4 shards -> {out} (text fields: question; vector fields: "
                        "image; metric: vqa)\n")
    with CacheWriter(tmp_path / "cache", shape=(4, 8)) as w:
        for image_id in [*range(1, 11), *range(101, 105)]:
            w.put(str(image_id), np.zeros((4, 8)))
    r = run("check", out, "--cache", f"image={tmp_path / 'cache'}")
    assert r.exit_code == 0 and r.output.startswith("ok: every id of 16 train, 4 select and 8 eval records is in ")
    # settings that do not go together: exit 2, nothing written
    for extra, message in (
            (("--eval-splits", "val", "--eval-fraction", 0.3),
             "--eval-fraction 0.3: the eval side is --eval-splits val whole; give one or the other"),
            (("--train-splits", "train"), "--train-splits train: give the eval side's splits with --eval-splits "
                                          "too (or pool splits and split them at random with --splits)"),
            (("--splits", "train,val", "--eval-splits", "val"),
             "--splits train,val: --splits pools splits to split them at random; with --eval-splits, name the "
             "train side's splits with --train-splits"),
            (("--train-splits", "train,val", "--eval-splits", "val"),
             "--train-splits and --eval-splits both name val: a split goes to one side"),
            (("--select-fraction", 1), "--select-fraction 1.0: must be between 0 and 1 (0: no select side)"),
            (("--eval-fraction", 1), "--eval-fraction 1.0: must be between 0 and 1")):
        r = run("shards", vqa, tmp_path / "other", "--images-root", coco, *extra)
        assert r.exit_code == 2 and r.output.endswith(f"Error: {message}\n"), (extra, r.output)
        assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("command", [[], ["shapes"], ["shards"], ["check"]])
def test_every_help_has_an_example(command):
    r = run(*command, "--help")
    assert r.exit_code == 0 and "Example:" in r.output
