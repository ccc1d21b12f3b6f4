"""Reader of the VQA v2 layout (Goyal et al., "Making the V in VQA Matter", CVPR 2017).

The layout, per split (``train``, ``val``; the synthetic shapes dataset writes the same)::

    v2_OpenEnded_mscoco_{split}2014_questions.json   {"questions": [{"question_id", "image_id", "question"}]}
    v2_mscoco_{split}2014_annotations.json           {"annotations": [{"question_id", "image_id",
                                                       "answers": [10 x {"answer", ...}], "answer_type",
                                                       "question_type", "multiple_choice_answer"}]}
    {split}2014/COCO_{split}2014_{image_id:012d}.jpg

The test splits are of 2015 and have no annotations: ``v2_OpenEnded_mscoco_test2015_questions.json``
and ``v2_OpenEnded_mscoco_test-dev2015_questions.json``, both over the images of ``test2015/``
(test-dev is a subset of test). The image folders may live elsewhere than the JSON files
(``images_root``: COCO is usually stored apart).

Every problem is reported as ``FILE: RECORD: PROBLEM`` in a :class:`VQAFormatError`; a record
that cannot be used (an empty question, one longer than ``max_question_chars``, ten empty answers)
is refused, not skipped.
"""

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import VQAFormatError
from ..metrics.vqa import target_answer
from .example import Example

ANSWERS_PER_QUESTION = 10
# VQA v2 questions are under 300 characters; a longer one is a broken file, and a huge one would be
# tokenized again in every batch that holds it (``vqa-data shards --max-question-chars``).
MAX_QUESTION_CHARS = 1000
_QUESTIONS_RE = re.compile(r"^v2_OpenEnded_mscoco_([\w-]+?)(\d{4})_questions\.json$")
TEST_SPLITS = ("test", "test-dev")  # of 2015, without annotations


def split_year(split: str) -> int:
    """The year in a split's file names: 2015 for ``test`` and ``test-dev``, else 2014."""
    return 2015 if split in TEST_SPLITS else 2014


def _image_split(split: str) -> str:
    return "test" if split == "test-dev" else split  # test-dev's images are test2015's


def questions_path(root, split: str) -> Path:
    return Path(root) / f"v2_OpenEnded_mscoco_{split}{split_year(split)}_questions.json"


def annotations_path(root, split: str) -> Path:
    return Path(root) / f"v2_mscoco_{split}{split_year(split)}_annotations.json"


def image_dir(root, split: str) -> Path:
    return Path(root) / f"{_image_split(split)}{split_year(split)}"


def image_name(split: str, image_id) -> str:
    return f"COCO_{_image_split(split)}{split_year(split)}_{int(image_id):012d}.jpg"


def image_path(root, split: str, image_id) -> Path:
    """Where the official layout keeps an image, e.g. ``train2014/COCO_train2014_000000000042.jpg``
    (``root``: the folder holding the image folders)."""
    return image_dir(root, split) / image_name(split, image_id)


@dataclass(frozen=True)
class QARecord:
    """One question with its 10 human answers.

    Attributes:
        question_id: the VQA question id.
        image_id: the image id as a string (COCO's int id in decimal; the cache's key).
        question: the question text.
        answers: the 10 human answers, in annotation order.
        answer_type: ``yes/no``, ``number`` or ``other``.
        multiple_choice_answer: the official most common answer.
        question_type: the official question type (e.g. ``what color is the``), may be empty.
        split: the split of the source files (``train``, ``val``), which names the image folder.

    A question of a split without annotations (``test``, ``test-dev``) has no answers (``()``), an
    empty answer type and an empty ``multiple_choice_answer``: it can be answered, not scored.
    """

    question_id: int
    image_id: str
    question: str
    answers: tuple
    answer_type: str
    multiple_choice_answer: str
    question_type: str = ""
    split: str = "train"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["answers"] = list(self.answers)
        return d

    def to_example(self):
        """The record as an :class:`~pipelines.data.example.Example`: the question is the ``question``
        text, the image the ``image`` vector, the 10 answers the references and the most frequent
        one the target; answer and question type are the groups the score is broken down by."""
        groups = {"answer_type": self.answer_type, **({"question_type": self.question_type} if self.question_type else {})}
        return Example(id=self.question_id, texts={"question": self.question}, vectors={"image": self.image_id},
                       target=target_answer(self.answers) if self.answers else "", references=tuple(self.answers),
                       groups=groups if self.answer_type else {}, split=self.split)

    @classmethod
    def from_dict(cls, d: dict) -> "QARecord":
        known = cls.__dataclass_fields__
        return cls(**{k: (tuple(v) if k == "answers" else v) for k, v in d.items() if k in known})


def discover_splits(root, annotated: bool = False) -> list:
    """The splits under ``root`` that have a questions file, sorted; with ``annotated``, only those
    with an annotations file too (the test splits have none), unless none has one (reading them
    then names the missing file)."""
    root = Path(root)
    if not root.is_dir():
        raise VQAFormatError(f"{root}: no such folder")
    splits = sorted(m.group(1) for m in map(_QUESTIONS_RE.match, os.listdir(root))
                    if m and int(m.group(2)) == split_year(m.group(1)))
    if not splits:
        raise VQAFormatError(f"{root}: no VQA v2 questions file "
                             "(v2_OpenEnded_mscoco_<split>2014_questions.json)")
    if annotated:
        splits = [s for s in splits if annotations_path(root, s).is_file()] or splits
    return splits


def _load(path: Path, key: str) -> list:
    if not path.is_file():
        raise VQAFormatError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise VQAFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise VQAFormatError(f"{path}: top level: expected an object with a {key!r} list")
    return data[key]


def _int_field(rec, field, path, label):
    v = rec.get(field) if isinstance(rec, dict) else None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        missing = not isinstance(rec, dict) or field not in rec
        what = "missing" if missing else f"{v!r} is not a non-negative integer"
        raise VQAFormatError(f"{path}: {label}: {field} {what}")
    return v


def _str_field(rec, field, path, label, default=None):
    v = rec.get(field, default)
    if not isinstance(v, str):
        what = "missing" if field not in rec else f"{v!r} is not a string"
        raise VQAFormatError(f"{path}: {label}: {field} {what}")
    return v


def _label(rec, index, kind):
    qid = rec.get("question_id") if isinstance(rec, dict) else None
    if isinstance(qid, int) and not isinstance(qid, bool):
        return f"{kind} {qid}"
    return f"{kind} #{index}"


def _read_questions(path: Path, max_chars: int = MAX_QUESTION_CHARS) -> dict:
    questions = {}
    for i, rec in enumerate(_load(path, "questions")):
        label = _label(rec, i, "question")
        if not isinstance(rec, dict):
            raise VQAFormatError(f"{path}: {label}: expected an object, got {type(rec).__name__}")
        qid = _int_field(rec, "question_id", path, label)
        image_id = _int_field(rec, "image_id", path, label)
        text = _str_field(rec, "question", path, label)
        if not text.strip():
            raise VQAFormatError(f"{path}: {label}: empty question")
        if len(text) > max_chars:
            raise VQAFormatError(f"{path}: {label}: {len(text):,} characters, more than --max-question-chars "
                                 f"{max_chars:,} (VQA v2 questions are under 300)")
        if qid in questions:
            raise VQAFormatError(f"{path}: {label}: duplicate question_id")
        questions[qid] = (image_id, text)
    return questions


def _answers(rec, path, label) -> tuple:
    answers = rec.get("answers")
    if not isinstance(answers, list):
        raise VQAFormatError(f"{path}: {label}: answers {'missing' if answers is None else 'is not a list'}")
    if len(answers) != ANSWERS_PER_QUESTION:
        raise VQAFormatError(f"{path}: {label}: {len(answers)} answers, expected {ANSWERS_PER_QUESTION}")
    out = []
    for j, a in enumerate(answers):
        text = a.get("answer") if isinstance(a, dict) else None
        if not isinstance(text, str):
            raise VQAFormatError(f"{path}: {label}: answers[{j}] has no answer string")
        out.append(text)
    if not any(a.strip() for a in out):  # no prediction can be scored against ten empty answers
        raise VQAFormatError(f"{path}: {label}: all {ANSWERS_PER_QUESTION} answers are empty, so it cannot be scored")
    return tuple(out)


def read_split(root, split: str, check_images: bool = True, max_question_chars: int = MAX_QUESTION_CHARS,
               images_root=None, require_annotations: bool = True) -> list:
    """Read one split's questions and annotations into :class:`QARecord` s (questions file order).

    Args:
        root: the folder holding the JSON files (and, by default, the image folders).
        split: ``train``, ``val``, ``test-dev``, ...
        check_images: require every image file to exist under ``{split}2014/``.
        max_question_chars: refuse a question longer than this (``--max-question-chars``).
        images_root: the folder holding ``{split}2014/`` (``--images-root``; default ``root``).
        require_annotations: refuse a split without an annotations file; if false, its questions
            are read without answers (the test splits).

    Raises:
        VQAFormatError: a file is missing or malformed, a question has no annotation (or the other
            way round), question and annotation disagree on the image, a question is empty or
            longer than ``max_question_chars``, an answer list is not 10 long or all its answers
            are empty, or an image is missing.
        ValueError: ``max_question_chars`` is below 1.
    """
    if isinstance(max_question_chars, bool) or not isinstance(max_question_chars, int) or max_question_chars < 1:
        raise ValueError(f"--max-question-chars {max_question_chars}: must be a positive integer")
    qpath, apath = questions_path(root, split), annotations_path(root, split)
    questions = _read_questions(qpath, max_question_chars)
    images_root = root if images_root is None else images_root
    if not require_annotations and not apath.exists():
        if check_images:
            _check_images(images_root, split, qpath, questions)
        return [QARecord(question_id=qid, image_id=str(image_id), question=text, answers=(), answer_type="",
                         multiple_choice_answer="", split=split) for qid, (image_id, text) in questions.items()]
    annotations = {}
    for i, rec in enumerate(_load(apath, "annotations")):
        label = _label(rec, i, "annotation of question")
        if not isinstance(rec, dict):
            raise VQAFormatError(f"{apath}: {label}: expected an object, got {type(rec).__name__}")
        qid = _int_field(rec, "question_id", apath, label)
        if qid in annotations:
            raise VQAFormatError(f"{apath}: {label}: duplicate annotation")
        if qid not in questions:
            raise VQAFormatError(f"{apath}: {label}: no such question in {qpath.name}")
        image_id = _int_field(rec, "image_id", apath, label)
        if image_id != questions[qid][0]:
            raise VQAFormatError(f"{apath}: {label}: image_id {image_id}, but {qpath.name} says "
                                 f"{questions[qid][0]}")
        answers = _answers(rec, apath, label)
        answer_type = _str_field(rec, "answer_type", apath, label)
        mca = _str_field(rec, "multiple_choice_answer", apath, label)
        qtype = _str_field(rec, "question_type", apath, label, default="")
        annotations[qid] = (answers, answer_type, mca, qtype)
    for qid in questions:
        if qid not in annotations:
            raise VQAFormatError(f"{qpath}: question {qid}: no annotation in {apath.name}")
    if check_images:
        _check_images(images_root, split, qpath, questions)
    records = []
    for qid, (image_id, text) in questions.items():
        answers, answer_type, mca, qtype = annotations[qid]
        records.append(QARecord(question_id=qid, image_id=str(image_id), question=text, answers=answers,
                                answer_type=answer_type, multiple_choice_answer=mca, question_type=qtype,
                                split=split))
    return records


def _check_images(images_root, split, qpath, questions):
    folder = image_dir(images_root, split)
    if not folder.is_dir():
        raise VQAFormatError(f"{folder}: no such image folder (needed by {qpath.name}): give the folder that "
                             f"holds {folder.name}/ with --images-root, or skip the image check with "
                             "--no-check-images")
    present = set(os.listdir(folder))  # one listing, not one stat per question
    for qid, (image_id, _) in questions.items():
        name = image_name(split, image_id)
        if name not in present:
            raise VQAFormatError(f"{qpath}: question {qid}: unknown image {image_id} "
                                 f"(no {folder.name}/{name})")


def read_vqa(root, splits=None, check_images: bool = True, max_question_chars: int = MAX_QUESTION_CHARS,
             images_root=None) -> list:
    """Read and concatenate several splits (default: every split under ``root`` with annotations);
    see :func:`read_split`."""
    splits = discover_splits(root, annotated=True) if splits is None else list(splits)
    records, seen, folders = [], {}, {}
    for split in splits:
        for rec in read_split(root, split, check_images=check_images, max_question_chars=max_question_chars,
                              images_root=images_root):
            if rec.question_id in seen:
                raise VQAFormatError(f"{questions_path(root, split)}: question {rec.question_id}: "
                                     f"question_id also used in split {seen[rec.question_id]!r}")
            seen[rec.question_id] = split
            # The cache keys an image by its id alone: one id in two image folders would get one embedding.
            folder = folders.setdefault(rec.image_id, image_dir("", split).name)
            if folder != image_dir("", split).name:
                raise VQAFormatError(f"{questions_path(root, split)}: question {rec.question_id}: image_id "
                                     f"{rec.image_id} also names an image of {folder}/: the embedding cache keys "
                                     "images by id, so image ids must differ between image folders")
            records.append(rec)
    return records
