"""The official VQA v2 metric: answer normalisation as in vqaEval.py, leave-one-out accuracy, by type."""

import json

import pytest

from pipelines.metrics.vqa import (
    VQAScore,
    exact_match,
    normalize_answer,
    process_punctuation,
    question_only_baseline,
    target_answer,
    vqa_accuracy,
)


@pytest.mark.parametrize("pred, expected", [
    ("Two.", "2"),            # period dropped, lower case, number word -> digit
    ("1,000", "1000"),        # a comma between digits: every punctuation mark is deleted
    ("t-shirt", "t shirt"),   # a mark not next to a space becomes a space
    ("U.S.A.", "usa"),        # periods not followed by a digit are deleted
    ("none", "0"),            # "none" is a number word in the official map
    ("2.5", "2.5"),           # a period before a digit stays
    ("A dog", "dog"),         # articles dropped
    ("The  Red\tcar\n", "red car"),  # tabs, newlines and runs of spaces become one space
    ("dont", "don't"),        # contractions restored
    ("yes!", "yes"),
    ("left , right", "left right"),  # a mark next to a space is deleted
])
def test_normalize_answer_follows_the_official_rules(pred, expected):
    assert normalize_answer(pred) == expected


def test_official_examples_score_full_marks():
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0
    assert vqa_accuracy("U.S.A.", ["usa"] * 10) == 1.0
    assert vqa_accuracy("none", ["0"] * 10) == 1.0
    # humans disagree, so their answers are punctuation-processed too: "t-shirt" == "t shirt"
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0
    assert vqa_accuracy("T-Shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0


def test_unanimous_human_answers_are_taken_as_they_stand():
    # the official script processes the humans' answers only when they disagree
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert vqa_accuracy("two", ["two"] * 10) == 0.0  # the prediction becomes "2"


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_ladder(matching, expected):
    answers = ["cat"] * matching + ["dog", "cow", "pig"] * 4
    answers = answers[:10]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_target_and_exact_match():
    answers = ["red"] * 3 + ["blue"] * 3 + ["green"] * 4
    assert target_answer(answers) == "green"
    assert target_answer(["b", "a", "a", "b"]) == "b"  # a tie goes to the first to appear
    assert exact_match("Green.", answers) == 1.0
    assert exact_match("red", answers) == 0.0
    assert vqa_accuracy("red", answers) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_punctuation_rule_keeps_the_official_quirks():
    assert process_punctuation("a.b") == "ab"
    assert process_punctuation("." * 40) == "." * 8  # the official count=32 cap


def test_vqascore_by_answer_and_question_type_and_merge():
    s = VQAScore()
    assert s.add("yes", ["yes"] * 10, "yes/no", "is there a") == 1.0
    s.add("no", ["yes"] * 9 + ["no"], "yes/no", "is the")  # 1 human: 0.3
    s.add("Two", ["2"] * 10, "number", "how many")
    s.add("blue", ["red"] * 10, "other")  # no question type: counted everywhere else
    out = s.summary()
    assert next(iter(out)) == "metric" and out["metric"] == "vqa"  # which accuracy, first
    assert out["count"] == 4
    assert out["accuracy"] == pytest.approx((1 + 0.3 + 1 + 0) / 4)
    assert out["exact_match"] == pytest.approx(2 / 4)
    assert out["by_answer_type"]["yes/no"] == {"accuracy": pytest.approx(0.65), "exact_match": 0.5, "count": 2}
    assert out["by_answer_type"]["number"]["accuracy"] == 1.0
    assert sorted(out["by_question_type"]) == ["how many", "is the", "is there a"]
    assert out["by_question_type"]["is the"] == {"accuracy": pytest.approx(0.3), "exact_match": 0.0, "count": 1}

    # per-process sums combine exactly: two halves merged == the whole
    a, b = VQAScore(), VQAScore()
    a.add("yes", ["yes"] * 10, "yes/no", "is there a")
    a.add("no", ["yes"] * 9 + ["no"], "yes/no", "is the")
    b.add_batch(["Two", "blue"], [["2"] * 10, ["red"] * 10], ["number", "other"], ["how many", ""])
    assert a.merge(json.loads(json.dumps(b.state()))).summary() == out
    assert VQAScore().summary() == {"metric": "vqa", "accuracy": 0.0, "exact_match": 0.0, "count": 0, "by_answer_type": {},
                                    "by_question_type": {}, "by_group": {}}


def test_any_group_an_example_names_is_scored_on_its_own():
    s = VQAScore("exact")
    s.add("red", ["red"], groups={"needs": "both", "question_type": "what color"})
    s.add("blue", ["red"], groups={"needs": "both"})
    s.add("3", ["3"], groups={"needs": "sound", "loudness": ""})  # an empty value is no group
    out = s.summary()
    assert out["by_group"] == {"needs": {"both": {"accuracy": 0.5, "exact_match": 0.5, "count": 2},
                                         "sound": {"accuracy": 1.0, "exact_match": 1.0, "count": 1}}}
    assert list(out["by_answer_type"]) == ["all"] and out["accuracy"] == pytest.approx(2 / 3)
    whole = VQAScore("exact").merge(json.loads(json.dumps(s.state())))  # through JSON, as ranks gather it
    assert whole.summary() == out


def test_exact_metric_scores_a_match_with_any_reference():
    s = VQAScore("exact")
    assert s.add("Cat.", ["dog", "cat"]) == 1.0  # normalised, any reference
    assert s.add("cow", ["dog", "cat"]) == 0.0
    assert s.summary()["metric"] == "exact" and s.summary()["accuracy"] == 0.5
    with pytest.raises(ValueError, match="^metric 'bleu': choose one of vqa, exact$"):
        VQAScore("bleu")


def test_question_only_baseline_fits_the_best_answer_per_text():
    fit = [{"question": "q1", "answers": ["cat"] * 10}, {"question": "q1", "answers": ["cat"] * 10},
           {"question": "q1", "answers": ["dog"] * 10}, {"question": "q2", "answers": ["cow"] * 10}]
    assert question_only_baseline(fit) == pytest.approx(3 / 4)
    held_out = [{"question": "q1", "answers": ["cat"] * 10}, {"question": "unseen", "answers": ["cat"] * 10}]
    assert question_only_baseline(fit, held_out) == pytest.approx(1.0)  # unseen -> overall best: "cat"
