"""A synthetic VQA dataset of coloured shapes, written in exactly the VQA v2 layout (:mod:`pipelines.data.vqa`).

Each image is a small canvas (default 96x96 RGB JPEG) cut into a 3x3 grid; 2 to 6 objects sit in
distinct cells, each with a distinct (colour, shape) pair, so that "the red circle" names one object.
Questions (about 5 per image, distinct within an image) come from six templates:

========== ============================================== ==========================
template   example                                        answers
========== ============================================== ==========================
colour     What color is the triangle?                    6 colours
shape      What shape is the blue object?                 5 shapes
presence   Is there a green square?                       yes / no (balanced)
count      How many circles are there?                    0..6 (balanced per image)
position   Is the red cross at the top, in the middle or  left/middle/right,
           at the bottom?                                 top/middle/bottom
relation   Is the white diamond left of the blue circle?  yes / no (balanced)
========== ============================================== ==========================

Question types are VQA-style prefixes ("what color is the", "is there a", "how many", ...), with
position ("is the ... at the" / "on the") and relation ("is the ... left of the" / "above the")
questions told apart, so that accuracy by question type shows which skill a model lacks.

The question alone says little: the answer given a question text is close to uniform over its
template's answers, so a question-only majority baseline stays far below 60% (about 45% VQA
accuracy held out, 52% in-sample, on 2,000 images; see ``tests/test_data_shapes.py``). Each
question gets 10 answers: the truth, with 0 to 3 annotators (probabilities 55/25/12/8%) giving
another answer of the same template, so partial credit under the leave-one-out metric is
exercised. The truth always holds the majority (at least 7 of 10).

Everything is a function of ``(seed, image index)``: the same seed gives the same bytes, and a
dataset of N images is a prefix of one of 2N images. Image ids start at 1 (COCO style; ``first_id``
moves them, for a second split in the same folder); question id = image id * 1000 + question index,
as in VQA v2.
"""

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import DatasetExistsError
from ..files import write_atomic
from ..metrics.vqa import question_only_baseline
from .example import DATASET, DATASET_FORMAT, Example, examples_path, write_examples
from .splits import split_records
from .vqa import annotations_path, image_dir, image_name, questions_path, read_split

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (240, 220, 40),
    "purple": (150, 60, 200), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
BACKGROUND = (30, 30, 30)
GRID = 3
SUPERSAMPLE = 4  # draw large, then downsample: smooth edges
NOISE_P = (0.55, 0.25, 0.12, 0.08)  # P(0, 1, 2, 3 annotators disagree)
ANSWERS = 10


def _scene(rng: random.Random):
    """2..6 objects: ``{"color", "shape", "row", "col", "x", "y", "r"}`` (x, y, r in cell units)."""
    n = rng.randint(2, 6)
    return place(rng, rng.sample([(c, s) for c in COLORS for s in SHAPES], n))


def place(rng: random.Random, kinds) -> list:
    """Objects of the given ``(color, shape)`` kinds in distinct cells of the grid, each at a random
    size and offset within its cell (the size conventions the demo ViT was trained on)."""
    cells = rng.sample([(row, col) for row in range(GRID) for col in range(GRID)], len(kinds))
    objects = []
    for (color, shape), (row, col) in zip(kinds, cells):
        r = rng.uniform(0.26, 0.38)
        slack = 0.5 - r - 0.04
        objects.append({"color": color, "shape": shape, "row": row, "col": col,
                        "x": col + 0.5 + rng.uniform(-slack, slack),
                        "y": row + 0.5 + rng.uniform(-slack, slack), "r": r})
    return objects


def _polygon(shape, cx, cy, r):
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    w = r / 3  # cross
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w)]


def render(objects, size: int = 96) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` pixels."""
    big = size * SUPERSAMPLE
    unit = big / GRID
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy, r = o["x"] * unit, o["y"] * unit, o["r"] * unit
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r), fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def _name(o) -> str:
    return f"{o['color']} {o['shape']}"


# Each template: (rng, objects) -> (question, answer, answer_type, question_type, answer vocabulary)
# or None when the scene does not allow it.

def _one_with_unique(rng, objects, key):
    """An object whose ``key`` (``color`` or ``shape``) no other object shares, or None."""
    once = [o for o in objects if sum(p[key] == o[key] for p in objects) == 1]
    return rng.choice(once) if once else None


def _q_color(rng, objects):
    o = _one_with_unique(rng, objects, "shape")
    if o is None:
        return None
    return f"What color is the {o['shape']}?", o["color"], "other", "what color is the", list(COLORS)


def _q_shape(rng, objects):
    o = _one_with_unique(rng, objects, "color")
    if o is None:
        return None
    return f"What shape is the {o['color']} object?", o["shape"], "other", "what shape is the", list(SHAPES)


def _q_presence(rng, objects):
    present = {(o["color"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
        answer = "no"
    return f"Is there a {color} {shape}?", answer, "yes/no", "is there a", ["yes", "no"]


def _q_count(rng, objects):
    if rng.random() < 0.5:
        counts = {f"How many {PLURALS[s]} are there?": sum(o["shape"] == s for o in objects) for s in SHAPES}
    else:
        counts = {f"How many {c} objects are there?": sum(o["color"] == c for o in objects) for c in COLORS}
    value = rng.choice(sorted(set(counts.values())))  # balance the answers, not the texts
    question = rng.choice(sorted(q for q, n in counts.items() if n == value))
    return question, str(value), "number", "how many", [str(v) for v in range(max(value, 2) + 2)]


def _q_position(rng, objects):
    o = rng.choice(objects)
    if rng.random() < 0.5:
        return (f"Is the {_name(o)} on the left, in the middle or on the right?",
                ("left", "middle", "right")[o["col"]], "other", "is the ... on the", ["left", "middle", "right"])
    return (f"Is the {_name(o)} at the top, in the middle or at the bottom?",
            ("top", "middle", "bottom")[o["row"]], "other", "is the ... at the", ["top", "middle", "bottom"])


def _q_relation(rng, objects):
    pairs = [(a, b, axis) for a in objects for b in objects for axis in ("col", "row")
             if a is not b and a[axis] != b[axis]]
    if not pairs:
        return None
    a, b, axis = rng.choice(pairs)  # ordered pairs: "yes" and "no" equally likely
    if axis == "col":
        return (f"Is the {_name(a)} left of the {_name(b)}?", "yes" if a["col"] < b["col"] else "no",
                "yes/no", "is the ... left of the", ["yes", "no"])
    return (f"Is the {_name(a)} above the {_name(b)}?", "yes" if a["row"] < b["row"] else "no",
            "yes/no", "is the ... above the", ["yes", "no"])


TEMPLATES = {"color": _q_color, "shape": _q_shape, "presence": _q_presence, "count": _q_count,
             "position": _q_position, "relation": _q_relation}


def _answers(rng, truth, vocabulary):
    """10 human answers: the truth, with 0..3 annotators answering something else of the template."""
    answers = [truth] * ANSWERS
    wrong = [v for v in vocabulary if v != truth]
    n_wrong = rng.choices(range(len(NOISE_P)), weights=NOISE_P)[0]
    for slot in rng.sample(range(ANSWERS), n_wrong):
        answers[slot] = rng.choice(wrong)
    return answers


def make_image(seed: int, index: int, questions_per_image: int = 5, first_id: int = 1):
    """The scene and QA of image ``index`` (0-based) for ``seed``: ``(objects, image_id, qas)``; the
    image id is ``first_id + index``.

    Each qa is ``{"question_id", "question", "answers", "answer_type", "question_type",
    "multiple_choice_answer"}``.
    """
    rng = random.Random(f"shapes:{seed}:{index}")  # str seeds hash deterministically (sha512)
    objects = _scene(rng)
    image_id = first_id + index
    qas, texts = [], set()
    names = list(TEMPLATES)
    for _ in range(20 * questions_per_image):
        if len(qas) == questions_per_image:
            break
        got = TEMPLATES[rng.choice(names)](rng, objects)
        if got is None or got[0] in texts:
            continue
        question, truth, answer_type, question_type, vocabulary = got
        texts.add(question)
        qas.append({"question_id": image_id * 1000 + len(qas), "question": question,
                    "answers": _answers(rng, truth, vocabulary), "answer_type": answer_type,
                    "question_type": question_type, "multiple_choice_answer": truth})
    return objects, image_id, qas


def write_shapes(out, images: int = 2000, seed: int = 0, size: int = 96, split: str = "train",
                 questions_per_image: int = 5, progress=None, first_id: int = 1) -> dict:
    """Write the dataset to ``out`` in the VQA v2 layout.

    Images are written first, then the annotations, then the questions file (each JSON file through
    a temporary name), so an interrupted run leaves no questions file and is not taken for a dataset.

    Args:
        out: output folder (created).
        images: number of images.
        seed: the dataset's seed.
        size: image side in pixels (the embed stage resizes to the ViT's input).
        split: split name in the file names (``train`` -> ``train2014/``).
        questions_per_image: questions per image (fewer when a scene allows fewer distinct ones).
        progress: optional callable, called with 1 per image written.
        first_id: the first image's id. Another split of the same folder needs ids of its own (the
            cache keys images by id) and another seed (the same seed draws the same scenes), e.g.
            ``split="val", seed=1, first_id=100001``.

    Returns:
        ``{"images", "questions", "answer_types": {type: count}, "root"}``.
    """
    if images < 1:
        raise ValueError(f"--images {images}: must be at least 1")
    if not 16 <= size <= 1024:
        raise ValueError(f"--size {size}: must be in 16..1024 pixels")
    if not 1 <= questions_per_image <= 20:
        raise ValueError(f"--questions-per-image {questions_per_image}: must be in 1..20")
    if isinstance(first_id, bool) or not isinstance(first_id, int) or first_id < 0:
        raise ValueError(f"--first-id {first_id}: must be a non-negative integer")
    out = Path(out)
    qpath, apath = questions_path(out, split), annotations_path(out, split)
    if qpath.exists():
        raise DatasetExistsError(f"{qpath} exists: write the dataset to another folder or delete it first")
    folder = image_dir(out, split)
    folder.mkdir(parents=True, exist_ok=True)
    questions, annotations, types = [], [], {}
    for index in range(images):
        objects, image_id, qas = make_image(seed, index, questions_per_image, first_id)
        buf = io.BytesIO()
        render(objects, size).save(buf, format="JPEG", quality=95)
        (folder / image_name(split, image_id)).write_bytes(buf.getvalue())
        for qa in qas:
            questions.append({"image_id": image_id, "question": qa["question"],
                              "question_id": qa["question_id"]})
            annotations.append({
                "question_id": qa["question_id"], "image_id": image_id,
                "question_type": qa["question_type"], "answer_type": qa["answer_type"],
                "multiple_choice_answer": qa["multiple_choice_answer"],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                            for j, a in enumerate(qa["answers"])],
            })
            types[qa["answer_type"]] = types.get(qa["answer_type"], 0) + 1
        if progress:
            progress(1)
    info = {"description": "where-to-fuse synthetic shapes (VQA v2 layout)", "seed": seed,
            "images": images, "size": size, "questions_per_image": questions_per_image}
    common = {"info": info, "license": {"name": "CC0"}, "data_type": "mscoco",
              "data_subtype": folder.name}
    write_atomic(apath, json.dumps({**common, "annotations": annotations}))
    write_atomic(qpath, json.dumps({**common, "task_type": "Open-Ended", "questions": questions}))
    return {"images": images, "questions": len(questions), "answer_types": dict(sorted(types.items())),
            "root": str(out)}


# ---- the notes task: two fields that each carry half of the answer ---------------------------------

NOTES_TYPES = ("what color is the marked", "what shape is the marked")


def make_notes(seed: int, index: int, first_id: int = 1) -> tuple:
    """The scene and the examples of image ``index`` of the notes task: ``(objects, image_id, examples)``.

    Each example has two text fields, a ``note`` that says which object is marked ("The marked object
    is the triangle.") and the ``question`` ("What color is the marked object?"), and the ``image``
    vector field: the note says which object, only the image shows its colour (or, for a note that
    names a colour, its shape). Without the image, the answer given the texts is uniform over the
    colours (shapes); without the note, the model can only guess which object is marked.
    """
    rng = random.Random(f"notes:{seed}:{index}")
    objects = _scene(rng)
    image_id = first_id + index
    examples = []
    for key, other, qtype in (("shape", "color", NOTES_TYPES[0]), ("color", "shape", NOTES_TYPES[1])):
        o = _one_with_unique(rng, objects, key)
        if o is None:
            continue
        note = f"The marked object is the {o[key]}." if key == "shape" else f"The marked object is {o[key]}."
        question = f"What {'color' if other == 'color' else 'shape'} is the marked object?"
        examples.append(Example(id=image_id * 1000 + len(examples), texts={"note": note, "question": question},
                                vectors={"image": str(image_id)}, target=o[other], references=(o[other],),
                                groups={"answer_type": "other", "question_type": qtype}))
    return objects, image_id, examples


def write_notes(out, images: int = 2000, seed: int = 0, size: int = 96, split: str = "train",
                first_id: int = 1, progress=None) -> dict:
    """Write the notes task (:func:`make_notes`) to ``out`` in the examples layout
    (:mod:`pipelines.data.example`): ``images/{id}.jpg`` (embed them with ``embed out/images``),
    ``examples-{split}.jsonl`` and ``dataset.json`` (metric ``exact``: one label per example).

    Returns:
        ``{"images", "examples", "root"}``.
    """
    if images < 1:
        raise ValueError(f"--images {images}: must be at least 1")
    if not 16 <= size <= 1024:
        raise ValueError(f"--size {size}: must be in 16..1024 pixels")
    out = Path(out)
    path = examples_path(out, split)
    if path.exists():
        raise DatasetExistsError(f"{path} exists: write the dataset to another folder or delete it first")
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for index in range(images):
        objects, image_id, exs = make_notes(seed, index, first_id)
        render(objects, size).save(folder / f"{image_id}.jpg", format="JPEG", quality=95)
        examples.extend(exs)
        if progress:
            progress(1)
    info = {"format": DATASET_FORMAT, "metric": "exact",
            "description": "where-to-fuse synthetic notes task: the note says which object, the image shows it",
            "seed": seed, "size": size}
    if not (out / DATASET).exists():
        write_atomic(out / DATASET, json.dumps(info, indent=2) + "\n")
    write_examples(out, split, examples)
    return {"images": images, "examples": len(examples), "root": str(out)}


def held_out_baseline(vqa_dir, split: str = "train", seed: int = 0) -> float | None:
    """The question-only baseline of a dataset: VQA accuracy of answering from the question text
    alone, fitted on 80% of the images and scored on the rest (``None`` with fewer than 2 images)."""
    records = read_split(vqa_dir, split, check_images=False)
    if len({r.image_id for r in records}) < 2:
        return None
    train, evals = split_records(records, seed=seed)
    return question_only_baseline(train, evals)
