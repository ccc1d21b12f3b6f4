"""The audio-visual example end to end (``fuse-avdemo``), and a run that fuses an image, a sound and two
text fields, each at its own layer: real clips (wav, png) embedded by the shipped demo encoders through
``embed`` and ``embed --modality audio``, real LMDB caches, shards and training steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.online import embed_file
from store import CacheReader

BIN = Path(sys.executable).parent


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def avdemo(tmp_path_factory):
    out = tmp_path_factory.mktemp("avdemo") / "demo"
    res = run("fuse-avdemo", "--out", out, "--clips", 30, "--steps", 2)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout


def test_avdemo_runs_every_stage_and_prints_the_table(avdemo):
    out, stdout = avdemo
    assert "2/4 embed image: 30 embedded, 0 already cached, 0 failed" in stdout
    assert "2/4 embed audio: 30 embedded, 0 already cached, 0 failed" in stdout
    head = next(line for line in stdout.splitlines() if line.startswith("model"))
    assert head.split() == ["model", "--fuse", "needs", "sound", "needs", "image", "needs", "both", "all", "steps/s"]
    for name, fuse in (("image+audio", "0:question 0:image 0:audio"), ("image", "0:question 0:image"),
                       ("audio", "0:question 0:audio")):
        results = json.loads((out / "runs" / name / "results.json").read_text())
        assert results["config"]["fuse"] == fuse and results["metric"] == "exact"
        needs = results["last"]["by_group"]["needs"]
        assert set(needs) == {"sound", "image", "both"}
        assert sum(n["count"] for n in needs.values()) == results["last"]["count"]
        assert results["config"]["lr"] == 1e-3 and results["config"]["pool"] == ("audio:mean:1" if "audio" in name else "")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs" / "image+audio" / "tb"))
    events.Reload()  # the score per kind of question, as curves
    assert {"eval/needs/both", "eval/needs/image", "eval/needs/sound"} <= set(events.Tags()["scalars"])
    assert "together score" in stdout and "fuse-sweep --shards" in stdout

    again = run("fuse-avdemo", "--out", out, "--clips", 30, "--steps", 2)  # a rerun redoes nothing
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2/4 embed audio: 0 embedded, 30 already cached, 0 failed" in again.stdout
    assert again.stdout.split("\n\n", 1)[1].splitlines()[:5] == stdout.split("\n\n", 1)[1].splitlines()[:5]

    before = (out / "runs" / "image+audio" / "results.json").read_bytes()
    other = run("fuse-avdemo", "--out", out, "--clips", 40, "--steps", 2)  # other data in that folder: refused
    assert other.returncode == 1
    assert f"Error: {out} holds the demo of --clips 30 --seed 0, not --clips 40 --seed 0" in other.stderr
    assert (out / "runs" / "image+audio" / "results.json").read_bytes() == before


def test_fuse_eval_answers_a_question_about_one_frame_and_one_sound(avdemo):
    out, _ = avdemo
    run_dir, clip = out / "runs" / "image+audio", sorted((out / "avshapes" / "clips").iterdir())[0]
    frame = out / "avshapes" / "frames" / f"{clip.stem}.png"
    ask = ["fuse-eval", run_dir, "--file", f"image={frame}", "--question", "How many beeps are there?"]
    res = run(*ask, "--file", f"audio={clip}")  # the sound embedded as `embed --modality audio` made the cache
    assert res.returncode == 0, res.stderr[-2000:]  # (after 2 steps the answer itself may be empty)
    for field, path in (("audio", clip), ("image", frame)):
        with CacheReader(out / "cache" / field) as cache:
            tokens = embed_file(cache.meta.producer, path)  # what fuse-eval fed the model
            np.testing.assert_allclose(tokens[0].numpy(), cache[clip.stem].astype(np.float32), rtol=2e-3, atol=2e-3)
    res = run(*ask, "--file", f"audio={frame}")
    assert res.returncode == 1
    assert f"Error: {frame}: cannot embed it: no audio stream (the file has video streams)" in res.stderr


def test_image_audio_and_two_text_fields_each_at_its_own_layer(avdemo, tmp_path):
    out, _ = avdemo
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text((out / "avshapes" / "dataset.json").read_text())
    for split in ("train", "val"):  # a second text field: a caption of the clip that names no answer
        lines = (out / "avshapes" / f"examples-{split}.jsonl").read_text().splitlines()
        with open(data / f"examples-{split}.jsonl", "w") as f:
            for line in lines:
                e = json.loads(line)
                e["texts"]["title"] = f"clip {e['vectors']['audio']}: shapes and a sound"
                f.write(json.dumps(e) + "\n")
    res = run("vqa-data", "shards", data, tmp_path / "qa", "--train-splits", "train", "--eval-splits", "val")
    assert res.returncode == 0, res.stderr
    caches = ["--cache", f"image={out / 'cache' / 'image'}", "--cache", f"audio={out / 'cache' / 'audio'}"]
    args = ["fuse-train", "--shards", tmp_path / "qa", *caches, "--fuse", "0:question 0:image 2:audio 3:title",
            "--t5", "demo", "--tokenizer", "words", "--steps", 3, "--batch-size", 8, "--eval-every", 3,
            "--eval-limit", 16, "--text-len", "title=12"]
    res = run(*args, "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["fuse"] == "0:question 0:image 2:audio 3:title"
    assert results["config"]["text_len"] == {"title": 12}
    assert results["last"]["count"] == 16 and results["last"]["by_group"]["needs"]

    # a field the data lacks is refused before any step, naming it
    res = run(*args[:6], "0:question 0:image 2:audio 3:description", *args[7:], "--out", tmp_path / "bad")
    assert res.returncode == 2
    assert "description" in res.stderr and not (tmp_path / "bad" / "results.json").exists()
