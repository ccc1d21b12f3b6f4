"""The audio-visual shapes data (``vqa-data avshapes``): deterministic files readable by soundfile and
PIL, balanced answers, questions that need what their group says (the question alone, the sound
alone and the frame alone all fall far short on the "both" questions), and shards that carry both
vector fields."""

import json
import random
from collections import Counter

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner
from PIL import Image

from pipelines.cli.data import cli
from pipelines.data import sounds
from pipelines.data.avshapes import (
    QUESTION_TYPES,
    cell,
    clip_examples,
    clip_id,
    majority_baseline,
    make_clip,
)
from pipelines.data.example import read_dataset_info, read_examples
from pipelines.data.shapes import COLORS, SHAPES

CLIPS = 1200  # in memory: no files (about 1 s)


@pytest.fixture(scope="module")
def clips():
    return [clip_examples(0, i) for i in range(CLIPS)]


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("av") / "data"
    r = run("avshapes", out, "--clips", 12, "--seed", 2)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_files_are_real_audio_and_frames_matching_the_examples(written):
    out, output = written
    assert "wrote 12 clips" in output and "question-only baseline" in output
    examples = read_examples(out)
    assert read_dataset_info(out)["metric"] == "exact"
    assert {e.split for e in examples} <= {"train", "val"} and len(examples) == 12 * 7
    for index in range(12):
        cid = clip_id(index)
        objects, sound, wave, exs = clip_examples(2, index)
        assert [e.to_dict() for e in exs] == [e.to_dict() for e in examples if e.vectors["audio"] == cid]
        data, rate = soundfile.read(out / "clips" / f"{cid}.wav", dtype="float32")
        assert rate == 16000 and data.ndim == 1 and len(data) == 16000
        assert np.abs(data - wave).max() < 1e-4  # 16-bit PCM of the synthesised waveform
        with Image.open(out / "frames" / f"{cid}.png") as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (96, 96)
        assert sum(o["shape"] == sound.voice for o in objects) == 1  # the sounding shape, exactly once
        assert 2 <= len(objects) <= 4
        assert len({o["shape"] for o in objects}) == len({o["color"] for o in objects}) == len(objects)


def test_same_seed_same_bytes_and_a_prefix_of_a_longer_set(written, tmp_path):
    out, _ = written
    again = tmp_path / "again"
    assert run("avshapes", again, "--clips", 6, "--seed", 2).exit_code == 0
    for name in ("clips/av00005.wav", "frames/av00005.png"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    first = [e.to_dict() for e in read_examples(again)]
    assert first == [e.to_dict() for e in read_examples(out) if e.id < 60]
    assert not np.array_equal(clip_examples(4, 5)[2], clip_examples(2, 5)[2])  # another seed, another clip


def test_a_written_folder_is_not_overwritten_and_bad_flags_name_themselves(written):
    out, _ = written
    before = (out / "examples-train.jsonl").read_bytes()
    r = run("avshapes", out, "--clips", 2)
    assert r.exit_code == 1 and "examples-train.jsonl exists" in r.output
    assert (out / "examples-train.jsonl").read_bytes() == before
    r = run("avshapes", out / "x", "--val-fraction", 1.5)
    assert r.exit_code != 0 and "--val-fraction 1.5" in r.output


def test_answers_are_balanced_per_template(clips):
    answers = {}
    for _, _, _, exs in clips:
        for e in exs:
            answers.setdefault(e.groups["question_type"], Counter())[e.target] += 1
    vocab = {"how many beeps": ["1", "2", "3", "4"], "is the beep": ["high", "low"], "what shape is making": list(SHAPES),
             "what color is the": list(COLORS), "what shape is the": list(SHAPES),
             "what color is the sounding": list(COLORS), "where is the shape": [cell(r, c) for r in range(3) for c in range(3)]}
    assert set(answers) == set(QUESTION_TYPES) == set(vocab)
    for qtype, counts in answers.items():
        assert set(counts) == set(vocab[qtype]), qtype
        shares = [c / CLIPS for c in counts.values()]
        assert max(shares) < 1 / len(vocab[qtype]) + 0.06, (qtype, counts)  # near uniform


def test_only_the_sound_and_the_frame_together_answer_the_both_questions(clips):
    train = [e for _, _, _, exs in clips for e in exs if e.split == "train"]
    val = [e for _, _, _, exs in clips for e in exs if e.split == "val"]
    assert 0.1 < len(val) / (len(train) + len(val)) < 0.3
    baseline = majority_baseline(train, val)  # the question text alone
    assert baseline["both"] < 0.3 and baseline["image"] < 0.3 and baseline["sound"] < 0.45, baseline
    # The sound alone: the voice names the shape, whose colour is independent of it (the best
    # guess per voice is the majority colour of that voice).
    per_voice = {}
    for _, sound, _, exs in clips:
        per_voice.setdefault(sound.voice, Counter())[exs[5].target] += 1
    audio_only = sum(c.most_common(1)[0][1] for c in per_voice.values()) / CLIPS
    assert audio_only < 0.3, audio_only
    # The frame alone: the best guess is one of the 2..4 candidates' colours (or cells).
    image_only = np.mean([1 / len(objects) for objects, _, _, _ in clips])
    assert 0.3 < image_only < 0.42, image_only
    # Both: the voice's shape in the frame gives every answer.
    for objects, sound, _, exs in clips[:200]:
        source = next(o for o in objects if o["shape"] == sound.voice)
        assert exs[5].target == source["color"] and exs[6].target == cell(source["row"], source["col"])
        assert exs[0].target == str(sound.count) and exs[1].target == sound.pitch and exs[2].target == sound.voice


def test_sounds_carry_their_attributes():
    """Beeps are countable from the envelope and the pitch from the spectrum, for every voice."""
    for i in range(40):
        rng = random.Random(f"test:{i}")
        s = sounds.random_sound(rng)
        wave = sounds.synthesize(s, rng)
        assert wave.dtype == np.float32 and len(wave) == 16000 and np.abs(wave).max() <= 1.0
        frames = np.abs(wave[:15920].reshape(-1, 80)).max(1)  # 5 ms peaks
        loud = frames > 0.25 * frames.max()
        onsets = np.flatnonzero(loud[1:] & ~loud[:-1]).size + int(loud[0])
        if s.voice != "cross":  # a click decays within its beep: its envelope may dip twice
            assert onsets == s.count, (s, onsets)
        spectrum = np.abs(np.fft.rfft(wave))
        peak = np.argmax(spectrum) * 16000 / len(wave)  # strongest partial: the fundamental or a harmonic
        assert (peak >= 800) == (s.pitch == "high") or s.voice in ("triangle", "square", "cross"), (s, peak)


def test_shards_carry_question_image_and_audio(written, tmp_path):
    out, _ = written
    r = run("shards", out, tmp_path / "qa", "--train-splits", "train", "--eval-splits", "val")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "qa" / "manifest.json").read_text())
    assert manifest["fields"] == {"texts": ["question"], "vectors": ["image", "audio"]}
    assert manifest["metric"] == "exact"
    assert manifest["train"]["count"] + manifest["eval"]["count"] == 12 * 7


def test_make_clip_is_a_function_of_seed_and_index():
    a, b = make_clip(7, 11), make_clip(7, 11)
    assert a[:3] == b[:3] and a[3].random() == b[3].random()
