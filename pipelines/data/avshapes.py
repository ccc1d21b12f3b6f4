"""A synthetic audio-visual dataset: a shapes frame and a sound per clip, questions that need the
sound, the frame or both. Written in the examples layout (:mod:`pipelines.data.example`).

Each clip is a still frame (``frames/{id}.png``, the shapes scene of :mod:`pipelines.data.shapes`:
2 to 4 objects on the 3x3 grid, distinct shapes, each its own colour, drawn at the shapes data's
sizes so the demo ViT embeds it) and a sound (``clips/{id}.wav``, 16 kHz mono, 1 s, from
:mod:`pipelines.data.sounds`): 1 to 4 beeps, low or high, in the voice of one shape kind (a circle
whistles, a square buzzes, a triangle saws, a diamond chirps, a cross clicks). The shape whose voice
sounds is in the frame, exactly once. Seven questions per clip, grouped by what they need
(``groups["needs"]``) and by template (``groups["question_type"]``):

======= ============================================================ ======================
needs   question                                                     answers
======= ============================================================ ======================
sound   How many beeps are there?                                    1..4
sound   Is the beep high or low?                                     high / low
sound   What shape is making the sound?  (the voice names it)        5 shapes
image   What color is the circle?  (a shape in the frame)            6 colours
image   What shape is the red object?  (a colour in the frame)       5 shapes
both    What color is the shape that is making the sound?            6 colours
both    Where is the shape that is making the sound?                 the cell: top left, top
                                                                     middle, ..., center, ...
======= ============================================================ ======================

Answers are balanced: every attribute is drawn uniformly, the sounding shape uniformly over the
five kinds and colours independently of shapes, so the question text alone is near chance per
template. The sound alone says which shape but not its colour or place (1/6 for the colour, 1/9 for
the cell); the frame alone shows 2 to 4 candidates in distinct cells (about 36% for the colour or the
cell when guessing among them): only both answer the ``both`` questions, by composing what the other
two kinds teach (which shape sounds, and what colour and cell a named shape has).

Everything is a function of ``(seed, clip index)`` (string seeds ``avshapes:{seed}:{index}``): the same
seed writes the same examples, and N clips are a prefix of 2N. Each clip falls in the ``val`` split
with probability ``val_fraction``, else in ``train``. Clip ids are ``av{index:05d}``: the stems of
both files, the key of both caches (``vectors: {"image": id, "audio": id}``).
"""

import json
import random
from collections import Counter
from pathlib import Path

import soundfile

from ..errors import DatasetExistsError
from ..files import write_atomic
from .example import DATASET, DATASET_FORMAT, Example, examples_path, write_examples
from .shapes import COLORS, GRID, SHAPES, place, render
from .sounds import COUNTS, PITCHES, SAMPLE_RATE, Sound, synthesize

NEEDS = ("sound", "image", "both")
QUESTION_TYPES = {  # question_type -> what it needs
    "how many beeps": "sound", "is the beep": "sound", "what shape is making": "sound", "what color is the": "image", "what shape is the": "image",
    "what color is the sounding": "both", "where is the shape": "both"}
SOUNDING = "the shape that is making the sound"
MIN_OBJECTS, MAX_OBJECTS = 2, 4
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "middle", "right")
assert GRID == 3


def cell(row: int, col: int) -> str:
    """The grid cell's name: ``top left``, ``top middle``, ..., ``center``, ..., ``bottom right``."""
    return "center" if (row, col) == (1, 1) else f"{ROWS[row]} {COLUMNS[col]}"


def clip_id(index: int) -> str:
    return f"av{index:05d}"


def make_clip(seed: int, index: int, val_fraction: float = 0.2) -> tuple:
    """Clip ``index`` of ``seed``: ``(objects, sound, split, rng)``: the frame's objects (the sounding
    one has ``"sounding": True``), the :class:`~pipelines.data.sounds.Sound`, ``train`` or ``val``, and the
    clip's random stream, positioned to draw the waveform next."""
    rng = random.Random(f"avshapes:{seed}:{index}")
    split = "val" if rng.random() < val_fraction else "train"
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    voice = rng.choice(SHAPES)  # uniform over the kinds, whatever else the frame holds
    shapes = [voice] + rng.sample([s for s in SHAPES if s != voice], n - 1)
    colors = rng.sample(list(COLORS), n)  # independent of the shapes
    objects = place(rng, list(zip(colors, shapes)))
    for o in objects:
        o["sounding"] = o["shape"] == voice
    sound = Sound(rng.choice(COUNTS), rng.choice(list(PITCHES)), voice)
    return objects, sound, split, rng


def questions(objects, sound: Sound, rng: random.Random) -> list:
    """``[(question, answer, question_type)]``, one per template, in the table's order."""
    source = next(o for o in objects if o["sounding"])
    seen, named = rng.choice(objects), rng.choice(objects)
    return [("How many beeps are there?", str(sound.count), "how many beeps"),
            ("Is the beep high or low?", sound.pitch, "is the beep"),
            ("What shape is making the sound?", sound.voice, "what shape is making"),
            (f"What color is the {seen['shape']}?", seen["color"], "what color is the"),
            (f"What shape is the {named['color']} object?", named["shape"], "what shape is the"),
            (f"What color is {SOUNDING}?", source["color"], "what color is the sounding"),
            (f"Where is {SOUNDING}?", cell(source["row"], source["col"]), "where is the shape")]


def clip_examples(seed: int, index: int, val_fraction: float = 0.2) -> tuple:
    """``(objects, sound, waveform, examples)`` of clip ``index`` (examples' ids: ``index * 10 + k``)."""
    objects, sound, split, rng = make_clip(seed, index, val_fraction)
    wave = synthesize(sound, rng)
    cid = clip_id(index)
    examples = [Example(id=index * 10 + k, texts={"question": q}, vectors={"image": cid, "audio": cid},
                        target=a, references=(a,), groups={"needs": QUESTION_TYPES[t], "question_type": t},
                        split=split)
                for k, (q, a, t) in enumerate(questions(objects, sound, rng))]
    return objects, sound, wave, examples


def write_avshapes(out, clips: int = 2000, seed: int = 0, size: int = 96, val_fraction: float = 0.2,
                   progress=None) -> dict:
    """Write the dataset to ``out``: ``frames/{id}.png``, ``clips/{id}.wav`` (16-bit PCM),
    ``examples-train.jsonl``, ``examples-val.jsonl`` and ``dataset.json`` (metric ``exact``).

    The examples files are written last (through temporary names), so an interrupted run leaves no
    dataset that looks complete.

    Args:
        out: output folder (created).
        clips: number of clips.
        seed: the dataset's seed.
        size: frame side in pixels (the embed stage resizes to the ViT's input).
        val_fraction: the chance of each clip to fall in the val split.
        progress: optional callable, called with 1 per clip written.

    Returns:
        ``{"clips", "examples": {split: count}, "baseline": {needs: accuracy}, "root"}``; ``baseline``
        is the question-only majority baseline (fitted on train, scored on val) per kind of question.
    """
    if clips < 1:
        raise ValueError(f"--clips {clips}: must be at least 1")
    if not 16 <= size <= 1024:
        raise ValueError(f"--size {size}: must be in 16..1024 pixels")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    out = Path(out)
    for split in ("train", "val"):
        if examples_path(out, split).exists():
            raise DatasetExistsError(f"{examples_path(out, split)} exists: write the dataset to another folder "
                                     "or delete it first")
    frames, sounds = out / "frames", out / "clips"
    frames.mkdir(parents=True, exist_ok=True)
    sounds.mkdir(parents=True, exist_ok=True)
    by_split = {"train": [], "val": []}
    for index in range(clips):
        objects, _, wave, examples = clip_examples(seed, index, val_fraction)
        cid = clip_id(index)
        render(objects, size).save(frames / f"{cid}.png", format="PNG")
        soundfile.write(sounds / f"{cid}.wav", wave, SAMPLE_RATE, subtype="PCM_16")
        by_split[examples[0].split].extend(examples)
        if progress:
            progress(1)
    info = {"format": DATASET_FORMAT, "metric": "exact",
            "description": "where-to-fuse audio-visual shapes: questions need the sound, the frame or both",
            "seed": seed, "clips": clips, "size": size, "val_fraction": val_fraction,
            "sample_rate": SAMPLE_RATE}
    write_atomic(out / DATASET, json.dumps(info, indent=2) + "\n")
    for split, examples in by_split.items():
        write_examples(out, split, examples)
    baseline = majority_baseline(by_split["train"], by_split["val"]) if by_split["train"] and by_split["val"] else {}
    return {"clips": clips, "examples": {k: len(v) for k, v in by_split.items()}, "baseline": baseline,
            "root": str(out)}


def majority_baseline(fit, evaluate) -> dict:
    """Exact match of answering each question text with its most frequent target in ``fit`` (a text
    unseen there: the most frequent target of its template), per ``groups["needs"]`` of ``evaluate``."""
    per_text, per_type = {}, {}
    for e in fit:
        per_text.setdefault(e.texts["question"], Counter())[e.target] += 1
        per_type.setdefault(e.groups["question_type"], Counter())[e.target] += 1
    hits, counts = Counter(), Counter()
    for e in evaluate:
        votes = per_text.get(e.texts["question"]) or per_type.get(e.groups["question_type"]) or Counter({"": 1})
        counts[e.groups["needs"]] += 1
        hits[e.groups["needs"]] += votes.most_common(1)[0][0] == e.target
    return {need: hits[need] / counts[need] for need in NEEDS if counts[need]}
