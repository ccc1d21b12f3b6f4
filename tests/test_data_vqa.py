"""The VQA v2 reader on good and broken files (exact messages), the image paths, and the splits."""

import json

import pytest

from pipelines.data.splits import split_records
from pipelines.data.vqa import (
    QARecord,
    VQAFormatError,
    annotations_path,
    discover_splits,
    image_path,
    questions_path,
    read_split,
    read_vqa,
)


def write_vqa(root, split="train", images=(1, 2, 3), per_image=2, write_images=True):
    """A tiny dataset in the official layout; returns (questions dict, annotations dict)."""
    root.mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for image_id in images:
        for k in range(per_image):
            qid = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": f"Question {qid}?", "question_id": qid})
            answers = ["yes"] * 8 + ["no", "yes"]
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": "is the",
                                "answer_type": "yes/no", "multiple_choice_answer": "yes",
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                            for j, a in enumerate(answers)]})
        if write_images:
            path = image_path(root, split, image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"jpeg")
    q = {"questions": questions}
    a = {"annotations": annotations}
    save(root, split, q, a)
    return q, a


def save(root, split, q=None, a=None):
    if q is not None:
        questions_path(root, split).write_text(json.dumps(q))
    if a is not None:
        annotations_path(root, split).write_text(json.dumps(a))


def test_reads_the_official_layout(tmp_path):
    write_vqa(tmp_path)
    records = read_split(tmp_path, "train")
    assert len(records) == 6
    r = records[0]
    assert r == QARecord(question_id=1000, image_id="1", question="Question 1000?",
                         answers=("yes",) * 8 + ("no", "yes"), answer_type="yes/no",
                         multiple_choice_answer="yes", question_type="is the", split="train")
    assert QARecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert image_path(tmp_path, "val", 42).name == "COCO_val2014_000000000042.jpg"
    assert image_path(tmp_path, "train", 0).relative_to(tmp_path).as_posix() == \
        "train2014/COCO_train2014_000000000000.jpg"


def test_pools_splits_and_finds_them(tmp_path):
    write_vqa(tmp_path, "train", images=(1, 2))
    write_vqa(tmp_path, "val", images=(3,))
    assert discover_splits(tmp_path) == ["train", "val"]
    records = read_vqa(tmp_path)
    assert [r.split for r in records] == ["train"] * 4 + ["val"] * 2
    assert len(read_vqa(tmp_path, splits=["val"])) == 2


def test_image_check_can_be_skipped(tmp_path):
    write_vqa(tmp_path, write_images=False)
    qpath = questions_path(tmp_path, "train")
    with pytest.raises(VQAFormatError) as e:
        read_split(tmp_path, "train")
    assert str(e.value) == (f"{tmp_path / 'train2014'}: no such image folder (needed by {qpath.name}): give the "
                            "folder that holds train2014/ with --images-root, or skip the image check with "
                            "--no-check-images")
    assert len(read_split(tmp_path, "train", check_images=False)) == 6


def test_images_may_live_apart_from_the_question_files(tmp_path):
    """COCO is usually stored apart from VQA's JSON files: images_root names the folder of train2014/."""
    write_vqa(tmp_path / "vqa")
    (tmp_path / "coco").mkdir()
    (tmp_path / "vqa" / "train2014").rename(tmp_path / "coco" / "train2014")
    with pytest.raises(VQAFormatError, match="no such image folder .*--images-root"):
        read_vqa(tmp_path / "vqa")
    assert read_vqa(tmp_path / "vqa", images_root=tmp_path / "coco") == read_split(tmp_path / "vqa", "train",
                                                                                   check_images=False)
    image_path(tmp_path / "coco", "train", 3).unlink()
    with pytest.raises(VQAFormatError) as e:
        read_split(tmp_path / "vqa", "train", images_root=tmp_path / "coco")
    assert str(e.value) == (f"{questions_path(tmp_path / 'vqa', 'train')}: question 3000: unknown image 3 "
                            "(no train2014/COCO_train2014_000000000003.jpg)")


def test_the_test_splits_are_of_2015_and_have_no_annotations(tmp_path):
    """VQA v2's test-dev and test questions come without annotations, over the images of test2015/;
    they are read (answers empty) only when asked, and never pooled into shards."""
    write_vqa(tmp_path, "train", images=(1, 2))
    q, _ = write_vqa(tmp_path, "test-dev", images=(7, 8))
    annotations_path(tmp_path, "test-dev").unlink()
    assert questions_path(tmp_path, "test-dev").name == "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    assert image_path(tmp_path, "test-dev", 7).relative_to(tmp_path).as_posix() == \
        "test2015/COCO_test2015_000000000007.jpg"
    assert image_path(tmp_path, "test", 7) == image_path(tmp_path, "test-dev", 7)
    assert discover_splits(tmp_path) == ["test-dev", "train"]
    assert discover_splits(tmp_path, annotated=True) == ["train"]
    assert [r.split for r in read_vqa(tmp_path)] == ["train"] * 4  # pools the annotated splits
    with pytest.raises(VQAFormatError, match="annotations.json: no such file"):
        read_split(tmp_path, "test-dev")
    records = read_split(tmp_path, "test-dev", require_annotations=False)
    assert [r.question_id for r in records] == [x["question_id"] for x in q["questions"]]
    assert records[0] == QARecord(question_id=7000, image_id="7", question="Question 7000?", answers=(),
                                  answer_type="", multiple_choice_answer="", question_type="", split="test-dev")
    image_path(tmp_path, "test-dev", 8).unlink()
    with pytest.raises(VQAFormatError, match=r"unknown image 8 \(no test2015/COCO_test2015_000000000008.jpg\)"):
        read_split(tmp_path, "test-dev", require_annotations=False)
    # a file of another year is not VQA v2's
    questions_path(tmp_path, "train").rename(tmp_path / "v2_OpenEnded_mscoco_train2015_questions.json")
    assert discover_splits(tmp_path) == ["test-dev"]


def test_one_image_id_in_two_image_folders_is_refused(tmp_path):
    """The cache keys images by id: train2014's image 1 and val2014's image 1 would share an embedding."""
    write_vqa(tmp_path, "train", images=(1, 2))
    q, a = write_vqa(tmp_path, "val", images=(2,))
    for rec in q["questions"] + a["annotations"]:
        rec["question_id"] += 500
    save(tmp_path, "val", q, a)
    with pytest.raises(VQAFormatError) as e:
        read_vqa(tmp_path)
    assert str(e.value) == (f"{questions_path(tmp_path, 'val')}: question 2500: image_id 2 also names an image "
                            "of train2014/: the embedding cache keys images by id, so image ids must differ "
                            "between image folders")


def _broken(tmp_path, edit):
    q, a = write_vqa(tmp_path)
    edit(q, a, tmp_path)
    save(tmp_path, "train", q, a)
    with pytest.raises(VQAFormatError) as e:
        read_split(tmp_path, "train")
    return str(e.value)


def test_broken_files_name_file_record_and_problem(tmp_path):
    qp, ap = questions_path(tmp_path, "train"), annotations_path(tmp_path, "train")

    def nine_answers(q, a, root):
        a["annotations"][1]["answers"].pop()
    assert _broken(tmp_path, nine_answers) == f"{ap}: annotation of question 1001: 9 answers, expected 10"

    def no_annotation(q, a, root):
        a["annotations"].pop(2)
    assert _broken(tmp_path, no_annotation) == \
        f"{qp}: question 2000: no annotation in v2_mscoco_train2014_annotations.json"

    def orphan_annotation(q, a, root):
        q["questions"].pop(0)
    assert _broken(tmp_path, orphan_annotation) == \
        f"{ap}: annotation of question 1000: no such question in v2_OpenEnded_mscoco_train2014_questions.json"

    def unknown_image(q, a, root):
        image_path(root, "train", 3).unlink()
    assert _broken(tmp_path, unknown_image) == \
        f"{qp}: question 3000: unknown image 3 (no train2014/COCO_train2014_000000000003.jpg)"

    def other_image(q, a, root):
        a["annotations"][0]["image_id"] = 2
    assert _broken(tmp_path, other_image) == \
        (f"{ap}: annotation of question 1000: image_id 2, "
         "but v2_OpenEnded_mscoco_train2014_questions.json says 1")

    def duplicate(q, a, root):
        q["questions"][1]["question_id"] = 1000
    assert _broken(tmp_path, duplicate) == f"{qp}: question 1000: duplicate question_id"

    def bad_id(q, a, root):
        q["questions"][0]["image_id"] = "one"
    assert _broken(tmp_path, bad_id) == f"{qp}: question 1000: image_id 'one' is not a non-negative integer"

    def no_text(q, a, root):
        del q["questions"][0]["question"]
    assert _broken(tmp_path, no_text) == f"{qp}: question 1000: question missing"

    def answer_not_text(q, a, root):
        a["annotations"][0]["answers"][3] = {"answer": 3}
    assert _broken(tmp_path, answer_not_text) == \
        f"{ap}: annotation of question 1000: answers[3] has no answer string"

    def not_a_list(q, a, root):
        q["questions"] = {"a": 1}
    assert _broken(tmp_path, not_a_list) == f"{qp}: top level: expected an object with a 'questions' list"

    def no_qid(q, a, root):
        del a["annotations"][4]["question_id"]
    assert _broken(tmp_path, no_qid) == f"{ap}: annotation of question #4: question_id missing"


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(VQAFormatError, match="no such folder"):
        discover_splits(tmp_path / "nowhere")
    with pytest.raises(VQAFormatError) as e:
        discover_splits(tmp_path)
    assert str(e.value) == (f"{tmp_path}: no VQA v2 questions file "
                            "(v2_OpenEnded_mscoco_<split>2014_questions.json)")
    write_vqa(tmp_path)
    annotations_path(tmp_path, "train").unlink()
    with pytest.raises(VQAFormatError) as e:
        read_split(tmp_path, "train")
    assert str(e.value) == f"{annotations_path(tmp_path, 'train')}: no such file"
    questions_path(tmp_path, "train").write_text("{not json")
    with pytest.raises(VQAFormatError, match=r"questions.json: not valid JSON \(Expecting property name"):
        read_split(tmp_path, "train")


def test_a_question_over_the_length_limit_is_refused_naming_it_and_the_flag(tmp_path):
    """A 10 MB question would be tokenized again in every batch that holds it: refused at read time."""
    from click.testing import CliRunner

    from pipelines.cli.data import cli

    q, _ = write_vqa(tmp_path)
    q["questions"][3]["question"] = "Is there a " + "very " * 2_000_000 + "red circle?"  # 10 MB
    save(tmp_path, "train", q)
    qp = questions_path(tmp_path, "train")
    with pytest.raises(VQAFormatError) as e:
        read_split(tmp_path, "train")
    assert str(e.value) == (f"{qp}: question 2001: 10,000,022 characters, more than --max-question-chars 1,000 "
                            "(VQA v2 questions are under 300)")
    r = CliRunner().invoke(cli, ["shards", str(tmp_path), str(tmp_path / "qa")])
    assert r.exit_code == 1 and r.output.endswith(f"Error: {e.value}\n"), r.output
    assert not (tmp_path / "qa").exists()
    # The limit is a setting: a longer one reads the question, one below 1 is refused as a usage error.
    q["questions"][3]["question"] = "Is there a " + "very " * 250 + "red circle?"  # 1,272 characters
    save(tmp_path, "train", q)
    assert read_split(tmp_path, "train", max_question_chars=2000)[3].question == q["questions"][3]["question"]
    with pytest.raises(VQAFormatError, match="question 2001: 1,272 characters, more than --max-question-chars 1,000"):
        read_vqa(tmp_path)
    with pytest.raises(ValueError, match="^--max-question-chars 0: must be a positive integer$"):
        read_split(tmp_path, "train", max_question_chars=0)
    r = CliRunner().invoke(cli, ["shards", str(tmp_path), str(tmp_path / "qa"), "--max-question-chars", "1300"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["shards", str(tmp_path), str(tmp_path / "qa2"), "--max-question-chars", "0"])
    assert r.exit_code == 2 and "Invalid value for '--max-question-chars': 0 is not in the range x>=1." in r.output


def test_ten_empty_answers_are_refused_naming_the_question(tmp_path):
    """Nothing can be scored against ten empty answers (any prediction would score 0 or, if empty, 100%)."""
    ap = annotations_path(tmp_path, "train")

    def all_empty(q, a, root):
        for answer in a["annotations"][1]["answers"]:
            answer["answer"] = ""
    assert _broken(tmp_path, all_empty) == \
        f"{ap}: annotation of question 1001: all 10 answers are empty, so it cannot be scored"

    def blank(q, a, root):
        for j, answer in enumerate(a["annotations"][4]["answers"]):
            answer["answer"] = " " * j
    assert _broken(tmp_path, blank) == \
        f"{ap}: annotation of question 3000: all 10 answers are empty, so it cannot be scored"
    # Some empty answers among real ones: a question like any other.
    q, a = write_vqa(tmp_path)
    for answer in a["annotations"][1]["answers"][:9]:
        answer["answer"] = ""
    save(tmp_path, "train", q, a)
    assert read_split(tmp_path, "train")[1].answers == ("",) * 9 + ("yes",)


def test_question_ids_unique_across_splits(tmp_path):
    write_vqa(tmp_path, "train", images=(1,))
    write_vqa(tmp_path, "val", images=(1,))
    with pytest.raises(VQAFormatError) as e:
        read_vqa(tmp_path)
    assert str(e.value) == \
        f"{questions_path(tmp_path, 'val')}: question 1000: question_id also used in split 'train'"


def _records(n_images, per_image=5):
    return [{"image_id": str(i), "question_id": i * 1000 + k}
            for i in range(n_images) for k in range(per_image)]


def test_split_by_image_keeps_images_on_one_side():
    records = _records(100)
    train, evals = split_records(records, seed=0)
    assert len(evals) == 100 and len(train) == 400  # 20 of 100 images, 5 questions each
    assert not {r["image_id"] for r in train} & {r["image_id"] for r in evals}
    assert train == [r for r in records if r in train]  # order kept
    # the split depends on the seed and the ids only, not the order of the records
    again = split_records(list(reversed(records)), seed=0)
    assert {r["question_id"] for r in again[1]} == {r["question_id"] for r in evals}
    assert split_records(records, seed=1)[1] != evals


def test_split_by_question_and_bad_arguments():
    records = _records(10, per_image=10)
    train, evals = split_records(records, by="question", eval_fraction=0.25, seed=3)
    assert len(evals) == 25 and len(train) == 75
    assert {r["image_id"] for r in train} & {r["image_id"] for r in evals}  # images on both sides
    with pytest.raises(ValueError, match="^--split-by pixel: choose one of image, question$"):
        split_records(records, by="pixel")
    with pytest.raises(ValueError, match="^--eval-fraction 1.0: must be between 0 and 1$"):
        split_records(records, eval_fraction=1.0)
    with pytest.raises(ValueError, match="^--eval-fraction 0.2 --split-by image: 1 distinct image"):
        split_records(_records(1))
    with pytest.raises(ValueError, match="^--select-fraction 0.05 --split-by image: 1 distinct image.*need at least"):
        split_records(_records(1), eval_fraction=0.05, flag="--select-fraction")
    assert [len(s) for s in split_records(_records(2, 1), eval_fraction=0.01)] == [1, 1]
