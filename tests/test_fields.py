"""Any text field and any vector field, each vector field joined from its own cache by its own id:
the example contract, the examples layout, the stream, fuse-train's field checks and fuse-eval's
--field / --file, over real shards, real LMDB caches and real runs."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pipelines.data.example import Example, ExampleFormatError, fields_of, read_examples, write_examples
from pipelines.data.shapes import COLORS, SHAPES, make_notes, write_notes
from pipelines.data.shards import read_manifest, shard_paths, write_qa_shards
from pipelines.data.stream import StreamConfig, eval_loader, train_loader
from pipelines.data.tokens import ByteTokenizer
from store import CacheWriter

IMAGE_SHAPE, AUDIO_SHAPE = (4, 8), (3, 6)


def image_value(key: str) -> float:
    return float(int(key[3:]))  # "img12" -> 12.0


def audio_value(key: str) -> float:
    return 1000.0 + int(key.rsplit("_", 1)[1])  # "yt_abc_000030" -> 1030.0 (exact in float16)


def example(n: int) -> dict:
    """Two text fields and two vector fields with ids of their own: a clip is shared by 3 examples, an
    image by 2, so neither id can be derived from the other or from the example's."""
    return {"id": f"ex{n}", "texts": {"title": f"title {n}", "question": f"what is in clip {n // 3}?"},
            "vectors": {"image": f"img{n // 2}", "audio": f"yt_abc_{n // 3:06d}"},
            "target": f"answer {n % 4}", "references": [f"answer {n % 4}"], "groups": {"answer_type": "other"}}


def make_cache(path, keys, shape, value):
    with CacheWriter(path, shape=shape, dtype="float16", producer={"model": "random"}) as w:
        for key in keys:
            w.put(key, np.full(shape, value(key), dtype=np.float32))


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """An examples folder of 60 examples (train) and 20 (val), its shards, an image and an audio cache."""
    root = tmp_path_factory.mktemp("multi")
    write_examples(root / "data", "train", [example(n) for n in range(60)])
    write_examples(root / "data", "val", [example(n) for n in range(60, 80)])
    (root / "data" / "dataset.json").write_text(json.dumps({"format": "where-to-fuse/examples", "metric": "exact"}))
    write_qa_shards(root / "data", root / "qa", train_splits=["train"], eval_splits=["val"], min_shards=2)
    make_cache(root / "image", sorted({example(n)["vectors"]["image"] for n in range(80)}), IMAGE_SHAPE, image_value)
    make_cache(root / "audio", sorted({example(n)["vectors"]["audio"] for n in range(80)}), AUDIO_SHAPE, audio_value)
    return root


def test_the_manifest_states_the_fields_and_the_metric(multi):
    manifest = read_manifest(multi / "qa")
    assert manifest["fields"] == {"texts": ["title", "question"], "vectors": ["image", "audio"]}
    assert manifest["metric"] == "exact" and manifest["layout"] == "examples"
    assert manifest["train"]["count"] == 60 and manifest["eval"]["count"] == 20


def test_batches_carry_each_text_field_and_each_vector_by_its_own_id(multi):
    caches = {"image": str(multi / "image"), "audio": str(multi / "audio")}
    cfg = StreamConfig(shards=shard_paths(multi / "qa", "train"), caches=caches, texts={"title": 8, "question": 64},
                       batch_size=7, num_workers=2, shuffle_buffer=20)
    by_id, seen, tok = {e["id"]: e for e in map(example, range(60))}, [], ByteTokenizer()
    for b in train_loader(cfg):
        for i, ex_id in enumerate(b["id"]):
            ex = by_id[ex_id]
            assert b["ids"] == {"image": b["ids"]["image"], "audio": b["ids"]["audio"]}
            assert b["ids"]["image"][i] == ex["vectors"]["image"] and b["ids"]["audio"][i] == ex["vectors"]["audio"]
            assert b["vectors"]["image"][i].float().unique().tolist() == [image_value(ex["vectors"]["image"])]
            assert b["vectors"]["audio"][i].float().unique().tolist() == [audio_value(ex["vectors"]["audio"])]
            for name, limit in (("title", 8), ("question", 64)):
                ids, mask = b["tokens"][name]
                want, _ = tok.encode_batch([ex["texts"][name]], limit)  # title: cut to 8 tokens
                assert ids[i][mask[i] == 1].tolist() == want[0].tolist()
            assert b["target"][i] == ex["target"] and b["references"][i] == ex["references"]
        assert b["vectors"]["audio"].shape[1:] == AUDIO_SHAPE and b["tokens"]["title"][0].shape[1] <= 8
        seen += b["id"]
    assert sorted(seen) == sorted(by_id)


def test_a_stream_of_text_fields_alone_needs_no_cache(multi):
    cfg = StreamConfig(shards=shard_paths(multi / "qa", "eval"), caches={}, texts={"title": 16}, batch_size=8,
                       num_workers=0)
    batches = list(eval_loader(cfg, 0, 1))
    assert [i for b in batches for i in b["id"]] == [f"ex{n}" for n in range(60, 80)]
    assert all(b["vectors"] == {} and set(b["tokens"]) == {"title"} for b in batches)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_fuse_train_takes_every_field_at_its_own_layer(multi, tmp_path):
    out = tmp_path / "run"
    r = run_cli("pipelines.cli.train", "--shards", multi / "qa", "--cache", f"image={multi / 'image'}",
                "--cache", f"audio={multi / 'audio'}", "--fuse", "0:title,question 1:image 2:audio",
                "--text-len", "title=8", "--pool", "audio:mean:1", "--t5", "demo", "--steps", "4", "--eval-every",
                "2", "--batch-size", "8", "--num-workers", "0", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert results["metric"] == "exact" and results["best"]["metric"] == "exact" and results["best"]["count"] == 20
    assert results["config"]["text_len"] == {"title": 8}
    run = json.loads((out / "checkpoints" / "best" / "fuse_run.json").read_text())
    assert run["text_fields"] == {"title": 8, "question": 128} and set(run["producers"]) == {"image", "audio"}
    config = json.loads((out / "checkpoints" / "best" / "config.json").read_text())
    assert config["text_modalities"] == ["title", "question"]
    assert config["fusion_spec"] == {"0": ["title", "question"], "1": ["image"], "2": ["audio"]}


@pytest.mark.parametrize("fuse, caches, message", [
    ("0:title,question,description 1:image", ("image",),
     "--fuse 0:title,question,description 1:image: the shards in {qa} have no field 'description' (text fields: "
     "title, question; vector fields: image, audio)"),
    ("0:question 1:audio", (), "--fuse 0:question 1:audio: 'audio' is a vector field of the shards in {qa}: give "
                               "its cache with --cache audio=PATH"),
    ("0:question", ("depth",), "--cache depth=PATH: the shards in {qa} have no field 'depth', so no id to look it "
                               "up by (text fields: title, question; vector fields: image, audio)"),
])
def test_a_field_the_data_lacks_is_refused_before_anything_runs(multi, tmp_path, fuse, caches, message):
    cache_flags = [x for name in caches for x in ("--cache", f"{name}={multi / 'image'}")]
    r = run_cli("pipelines.cli.train", "--shards", multi / "qa", *cache_flags, "--fuse", fuse, "--t5", "demo",
                "--steps", "2", "--out", tmp_path / "run")
    assert r.returncode == 2 and message.format(qa=multi / "qa") in r.stderr
    assert not (tmp_path / "run").exists()  # nothing made


def test_the_examples_layout_names_what_is_wrong_and_where(tmp_path):
    good = example(0)
    lines = [json.dumps(good), "{not json", json.dumps({**good, "id": "x"})]
    for bad_line, message in [
        ("{not json", "examples-train.jsonl:2: not valid JSON"),
        (json.dumps({**good, "id": "ex9", "vectors": {"image": 3.5}}),
         "examples-train.jsonl:2 (id ex9): vectors.image is float, not a string"),
        (json.dumps({**good, "id": "ex9", "texts": {}, "vectors": {}}), "no text and no vector field"),
        (json.dumps({**good, "id": "ex9", "references": "yes"}), "references is not a list of strings"),
        (json.dumps(good), "examples-train.jsonl:2: id 'ex0' also used at examples-train.jsonl:1"),
    ]:
        lines[1] = bad_line
        (tmp_path / "examples-train.jsonl").write_text("\n".join(lines[:2]) + "\n")
        with pytest.raises(ExampleFormatError) as e:
            read_examples(tmp_path)
        assert message in str(e.value)
    with pytest.raises(ExampleFormatError, match=r"not every example has text field 'title' \(1 of 2\)"):
        fields_of([good, {**good, "texts": {"question": "q"}}])


def test_a_vqa_record_is_an_example_with_a_question_and_an_image(vqa_data):
    from pipelines.data.stream import read_records

    recs = read_records(shard_paths(vqa_data(20, 0) / "qa", "train"))
    assert read_manifest(vqa_data(20, 0) / "qa")["fields"] == {"texts": ["question"], "vectors": ["image"]}
    for r in recs[:20]:
        ex = Example.from_dict(r)
        assert list(ex.texts) == ["question"] and list(ex.vectors) == ["image"] and len(ex.references) == 10
        assert str(ex.id).startswith(ex.vectors["image"])  # shapes: question id = image id * 1000 + k
        assert ex.target == max(ex.references, key=ex.references.count)


def test_the_notes_task_needs_the_note_and_the_image():
    objects, image_id, examples = make_notes(0, 3)
    assert examples and all(set(e.texts) == {"note", "question"} and e.vectors == {"image": str(image_id)}
                            for e in examples)
    for e in examples:
        named = e.texts["note"].removeprefix("The marked object is ").removeprefix("the ").rstrip(".")
        key, other = ("shape", "color") if named in SHAPES else ("color", "shape")
        marked = [o for o in objects if o[key] == named]
        assert len(marked) == 1 and e.target == marked[0][other] == e.references[0]  # the note says which
        assert e.target in (COLORS if other == "color" else SHAPES)


def test_fuse_eval_answers_one_example_given_field_by_field(tmp_path):
    from embed import EmbedConfig, embed
    from embed.registry import DEMO_VIT

    write_notes(tmp_path / "notes", images=24)
    embed(EmbedConfig(images=[str(tmp_path / "notes" / "images")], out=str(tmp_path / "cache"), model=DEMO_VIT,
                      pretrained=True, num_workers=0, batch_size=64, progress=False))
    write_qa_shards(tmp_path / "notes", tmp_path / "qa", min_shards=1)
    r = run_cli("pipelines.cli.train", "--preset", "demo", "--shards", tmp_path / "qa", "--cache",
                f"image={tmp_path / 'cache'}", "--fuse", "0:note,question 2:image", "--steps", "2", "--eval-every", "2",
                "--num-workers", "0", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    one = ["pipelines.cli.eval", tmp_path / "run", "--file", f"image={tmp_path / 'notes/images/1.jpg'}",
           "--field", "note=The marked object is the circle.", "--field", "question=What color is the marked object?"]
    r = run_cli(*one, "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["note"] == "The marked object is the circle." and isinstance(answer["answer"], str)
    r = run_cli(*one[:-2])
    assert r.returncode == 2 and "the model fuses note, question, image: give --field question=TEXT too" in r.stderr
    r = run_cli(*one, "--field", "title=x")
    assert r.returncode == 2 and "--field title: the model fuses no text field 'title'" in r.stderr
    (tmp_path / "not-an-image.jpg").write_text("hello")
    r = run_cli(*one[:3], f"image={tmp_path / 'not-an-image.jpg'}", *one[4:])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{tmp_path / 'not-an-image.jpg'}: cannot embed it: not an image" in r.stderr


# ---- captions: BLEU-4 and CIDEr-D of the COCO caption evaluation -------------------------------------

CAPTIONS = {"1": ["A man is playing a guitar.", "Someone plays the guitar on stage."],
            "2": ["A dog runs across the grass.", "The brown dog is running in a field."]}


def test_caption_scores_are_the_coco_evaluations():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from pipelines.metrics.captions import CaptionScore

    preds = {"1": "a man playing a guitar", "2": "a dog running in a field"}
    whole, ranks = CaptionScore(), [CaptionScore(), CaptionScore()]
    for i, (key, refs) in enumerate(CAPTIONS.items()):
        whole.add(preds[key], refs, "other", f"type {key}")
        ranks[i].add(preds[key], refs, "other", f"type {key}")
    merged = CaptionScore().merge(ranks[0]).merge(ranks[1].state())  # as the ranks' states are gathered
    summary = whole.summary()
    assert merged.summary() == summary and summary["metric"] == "caption" and summary["count"] == 2
    # the scorers on the PTB tokenizer's output (lower case, punctuation dropped), by hand
    gts = {"1": ["a man is playing a guitar", "someone plays the guitar on stage"],
           "2": ["a dog runs across the grass", "the brown dog is running in a field"]}
    res = {k: [v] for k, v in preds.items()}
    assert summary["bleu4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    assert summary["cider"] == summary["accuracy"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert 0 < summary["bleu4"] < 1 and summary["exact_match"] == 0.0
    assert set(summary["by_question_type"]) == {"type 1", "type 2"}
    perfect = CaptionScore()
    for refs in CAPTIONS.values():
        perfect.add(refs[0], refs)
    assert perfect.summary()["bleu4"] == pytest.approx(1.0) and perfect.summary()["exact_match"] == 1.0
    assert perfect.summary()["cider"] > summary["cider"]


def test_a_caption_dataset_is_scored_with_cider_and_bleu(multi, tmp_path):
    data = tmp_path / "captions"
    examples = [{**example(n), "target": f"a caption of clip {n // 3}",
                 "references": [f"a caption of clip {n // 3}", f"clip {n // 3} described"]} for n in range(40)]
    write_examples(data, "train", examples[:30])
    write_examples(data, "val", examples[30:])
    (data / "dataset.json").write_text(json.dumps({"format": "where-to-fuse/examples", "metric": "caption"}))
    write_qa_shards(data, tmp_path / "qa", train_splits=["train"], eval_splits=["val"], min_shards=1)
    r = run_cli("pipelines.cli.train", "--shards", tmp_path / "qa", "--cache", f"audio={multi / 'audio'}",
                "--fuse", "0:question 1:audio", "--t5", "demo", "--steps", "2", "--eval-every", "2", "--batch-size",
                "8", "--num-workers", "0", "--out", tmp_path / "run", "--json")
    assert r.returncode == 0, r.stderr
    best = json.loads(r.stdout)["best"]
    assert best["metric"] == "caption" and best["count"] == 10 and best["accuracy"] == best["cider"] >= 0
    assert "bleu4" in best and "CIDEr-D" in r.stderr
    r = run_cli("pipelines.cli.eval", tmp_path / "run")
    assert r.returncode == 0 and "CIDEr-D   BLEU-4" in r.stdout, r.stderr
