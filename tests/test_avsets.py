"""VGGSound, AudioSet and VALOR in their published formats (fixtures in tests/avsets_fixtures.py, a few
rows each, with tiny mp4 clips written here) -> the example contract; a malformed row of each format
is one line naming the file, the line and the problem; clips missing or failing to embed are listed,
never fatal unless --strict; the closed-label metrics against hand-computed values (scikit-learn's
definitions); the candidates' likelihoods against the model's own training loss; and the README's
recipes run as written on the fixtures (annotations + clips -> embed audio and frames -> shards ->
fuse-sweep -> fuse-eval)."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from avsets_fixtures import (
    AUDIOSET_CLIPS,
    AUDIOSET_EVAL_CSV,
    AUDIOSET_TRAIN_CSV,
    ONTOLOGY,
    VALOR_CLIPS,
    VALOR_TEST_JSON,
    VALOR_TRAIN_JSON,
    VGGSOUND_CLIPS,
    VGGSOUND_CSV,
    write_clip,
)
from click.testing import CliRunner

from pipelines.cli.data import cli as data_cli
from pipelines.data.avsets import read_audioset, read_valor, read_vggsound, write_avset
from pipelines.data.example import read_dataset_info, read_examples
from pipelines.metrics.labels import (
    LabelScore,
    MultiLabelScore,
    average_precision,
    f1_scores,
    mean_average_precision,
    split_labels,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def annotations(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "vggsound.csv").write_text(VGGSOUND_CSV)
    (root / "eval_segments.csv").write_text(AUDIOSET_EVAL_CSV)
    (root / "balanced_train_segments.csv").write_text(AUDIOSET_TRAIN_CSV)
    (root / "ontology.json").write_text(json.dumps(ONTOLOGY, indent=1))
    (root / "desc_train.json").write_text(VALOR_TRAIN_JSON)
    (root / "desc_test.json").write_text(VALOR_TEST_JSON)
    return root


def test_readers_follow_the_published_formats(tmp_path):
    root = annotations(tmp_path)
    rows, labels = read_vggsound([root / "vggsound.csv"])
    assert [r.key for r in rows][:3] == ["---g-f_I2yQ_000001", "--0PQM4-hqg_000030", "0_8-g2rof7E_000049"]
    heart = rows[2]
    assert heart.target == "heart sounds, heartbeat" and heart.split == "train"  # the quoted comma kept
    assert heart.where == f"{root / 'vggsound.csv'}:3"
    assert labels == sorted({"people marching", "waterfall burbling", "heart sounds, heartbeat",
                             "wind rustling leaves", "playing tennis"})

    rows, labels = read_audioset([root / "eval_segments.csv", root / "balanced_train_segments.csv"],
                                 root / "ontology.json")
    assert [r.split for r in rows] == ["eval", "eval", "balanced_train", "balanced_train", "balanced_train"]
    assert rows[0].where.endswith("eval_segments.csv:4")  # after the three '#' header lines
    assert rows[0].references == ("Domestic animals, pets", "Dog", "Squeak")  # ontology order, not the file's
    assert rows[0].target == "Domestic animals, pets; Dog; Squeak" and rows[0].fields["end"] == 10
    assert rows[4].references == ("Speech", "Goat", "Music")
    assert labels == ["Speech", "Domestic animals, pets", "Dog", "Squeak", "Hammer", "Gush", "Toothbrush", "Goat",
                      "Music"]  # the ids used, in the ontology's order

    rows, labels = read_valor([root / "desc_train.json", root / "desc_test.json"])
    assert labels == [] and [r.key for r in rows] == VALOR_CLIPS
    several = rows[3]
    assert several.split == "test" and several.where.endswith("desc_test.json:2")
    assert several.references == ("A crowd cheers as a car races past.", "Cars race by while people cheer loudly.",
                                  "People cheer at a car race.")  # a list and a second record of the clip
    assert several.target == several.references[0]


MALFORMED = [
    ("vggsound", "vggsound.csv", VGGSOUND_CSV.replace("--0PQM4-hqg,30,", "--0PQM4-hqg,thirty,"), [],
     "vggsound.csv:2: start seconds 'thirty' is not a number of seconds"),
    ("vggsound", "vggsound.csv", VGGSOUND_CSV.replace("0_8-g2rof7E,49,\"heart sounds, heartbeat\"",
                                                      "0_8-g2rof7E,49,heart sounds, heartbeat"), [],
     ('vggsound.csv:3: expected 4 columns (YouTube ID, start seconds, label, split), got 5 (a label holding a '
     'comma is quoted: "a, b")')),
    ("audioset", "eval_segments.csv", AUDIOSET_EVAL_CSV.replace('"/m/03l9g"', '/m/03l9g,/m/068hy'),
     ["--ontology", "ontology.json"], ('eval_segments.csv:5: expected 4 columns (YTID, start_seconds, end_seconds, '
     'positive_labels), got 5 (the label ids are quoted: "/m/09x0r,/m/05zppz")')),
    ("audioset", "eval_segments.csv", AUDIOSET_EVAL_CSV.replace('"/m/03l9g"', '"/m/nothing"'),
     ["--ontology", "ontology.json"], "eval_segments.csv:5: label id /m/nothing is not in ontology.json"),
    ("audioset", "eval_segments.csv", AUDIOSET_EVAL_CSV.replace("20.000, 30.000", "30.000, 20.000"),
     ["--ontology", "ontology.json"], "eval_segments.csv:5: end_seconds 20.000 is not after start_seconds 30.000"),
    ("valor", "desc_test.json", VALOR_TEST_JSON.replace('"desc": "People cheer at a car race."', '"desc": 7'), [],
     'desc_test.json:4: "desc" is not a caption (a non-empty string, or a list of them)'),
    ("valor", "desc_test.json", VALOR_TEST_JSON.replace('"video_id": "3dE5', '"video": "3dE5'), [],
     'desc_test.json:5: no "video_id" string'),
]


@pytest.mark.parametrize("fmt, name, text, extra, message", MALFORMED)
def test_a_malformed_row_is_one_line_naming_file_and_line(tmp_path, monkeypatch, fmt, name, text, extra, message):
    monkeypatch.chdir(annotations(tmp_path))
    Path(name).write_text(text)
    (tmp_path / "clips").mkdir()
    r = CliRunner().invoke(data_cli, [fmt, name, "--clips", "clips", "--out", "out", *extra])
    assert r.exit_code == 1 and r.output == f"Error: {message}\n", r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_missing_and_failed_clips_are_listed_not_fatal_unless_strict(tmp_path, monkeypatch):
    monkeypatch.chdir(annotations(tmp_path))
    clips = tmp_path / "clips"
    clips.mkdir()
    for seed, name in enumerate(VGGSOUND_CLIPS[:3]):
        write_clip(clips / f"{name}.mp4", seed)
    # an embed failures report beside a cache: the third clip failed to decode there
    from store import CacheWriter

    Path("cache").mkdir()
    with CacheWriter("cache/audio", shape=(1, 4)) as w:
        for name in VGGSOUND_CLIPS[:2]:
            w.put(name, np.zeros((1, 4), np.float16))
    Path("cache/audio.failures.jsonl").write_text(json.dumps(
        {"id": VGGSOUND_CLIPS[2], "path": "x", "reason": "not audio or video, or truncated"}) + "\n")

    r = CliRunner().invoke(data_cli, ["vggsound", "vggsound.csv", "--clips", "clips", "--out", "data",
                                      "--cache", "audio=cache/audio", "--modalities", "audio"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("vggsound: 2 examples (test: 1, train: 1) of 6 annotations, 5 labels; 4 left out "
                               "(failed (audio) 1, missing 3), listed in data/skipped.jsonl")
    skipped = [json.loads(line) for line in Path("data/skipped.jsonl").read_text().splitlines()]
    assert skipped[0] == {"id": "0_8-g2rof7E_000049", "clip": "clips/0_8-g2rof7E_000049.mp4",
                          "annotation": "vggsound.csv:3", "reason": "failed (audio): not audio or video, or truncated"}
    assert skipped[1] == {"id": "-XxUW9gW6mc_000060", "clip": "clips/-XxUW9gW6mc_000060.mp4",
                          "annotation": "vggsound.csv:4", "reason": "missing: no such file"}
    examples = read_examples("data")
    assert [(e.split, e.vectors) for e in examples] == [("test", {"audio": VGGSOUND_CLIPS[0]}),
                                                       ("train", {"audio": VGGSOUND_CLIPS[1]})]
    assert read_dataset_info("data")["labels"][0] == "heart sounds, heartbeat"
    assert [line.split("\t")[0] for line in Path("data/clips.tsv").read_text().splitlines()] == VGGSOUND_CLIPS[:3]

    r = CliRunner().invoke(data_cli, ["vggsound", "vggsound.csv", "--clips", "clips", "--out", "data", "--strict"])
    assert r.exit_code == 1 and r.output == ("Error: 3 of 6 annotations left out (--strict): missing 3; listed in "
                                             "data/skipped.jsonl\n")
    r = CliRunner().invoke(data_cli, ["vggsound", "vggsound.csv", "--clips", "clips", "--out", "data2",
                                      "--pattern", "{id}/{nope}.mp4"])
    assert r.exit_code == 2 and "--pattern {id}/{nope}.mp4: cannot be filled (KeyError: 'nope')" in r.output


def test_a_user_pattern_names_the_clips_and_their_ids(tmp_path):
    root = annotations(tmp_path / "a")
    clips = tmp_path / "clips" / "test"
    clips.mkdir(parents=True)
    write_clip(clips / "---g-f_I2yQ-1.mp4", 0)
    summary = write_avset("vggsound", [root / "vggsound.csv"], tmp_path / "clips", tmp_path / "out",
                          pattern="test/{id}-{start}.mp4")
    assert summary["examples"] == {"test": 1}
    (e,) = read_examples(tmp_path / "out")
    assert e.id == "---g-f_I2yQ_000001" and e.vectors == {"audio": "---g-f_I2yQ-1", "video": "---g-f_I2yQ-1"}
    assert e.texts == {"question": "What is making the sound?"} and e.target == e.references[0] == "people marching"
    # answer lengths that hold the longest target: fuse-train --config OUT/fuse.json
    assert json.loads((tmp_path / "out" / "fuse.json").read_text()) == {"max_answer_len": 16, "max_new_tokens": 16}


# ---- the metrics, against hand-computed values ----------------------------------------------------

def test_average_precision_is_scikit_learns():
    # scikit-learn's own example (its average_precision_score docstring): 0.83
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.8333, abs=1e-4)
    # ranks 1 and 3 positive: (1/2)(1) + (1/2)(2/3)
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # a tie is one threshold: at 0.5 precision 1/2, recall 1/2; at 0.2 precision 2/3, recall 1
    # (sklearn.metrics.average_precision_score([0, 1, 1], [0.5, 0.5, 0.2]) = 0.58333)
    assert average_precision([0.5, 0.5, 0.2], [0, 1, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert np.isnan(average_precision([0.1, 0.2], [0, 0]))
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.1, 0.6, 0.1]])
    truth = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]], bool)  # label 2 has no positive: not averaged
    # label 0: ranks 1 and 3 positive -> 5/6; label 1: rank 1 positive -> 1
    assert mean_average_precision(scores, truth) == pytest.approx((5 / 6 + 1) / 2)


def test_f1_and_exact_set_by_hand():
    f = f1_scores([["a", "b"], ["c"]], [["a"], ["c", "d"]])
    assert f["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # TP a, c; FP b; FN d
    assert f["macro_f1"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert f["exact_set"] == 0
    assert split_labels("Male speech, man speaking; Dog;; dog") == ["male speech man speaking", "dog"]


def test_label_scores_top1_from_likelihoods_and_multilabel_from_both():
    labels = ["dog barking", "cat purring", "heart sounds, heartbeat"]
    s = LabelScore(labels)
    s.add("heart sound heartbeat", ["heart sounds, heartbeat"], scores=[-9.0, -8.0, -1.0])  # a near miss, top-1 hit
    s.add("cat purring", ["dog barking"], scores=[-2.0, -1.0, -5.0])
    out = s.summary()
    assert (out["top1"], out["accuracy"], out["exact_match"], out["count"]) == (0.5, 0.5, 0.0, 2)

    m = MultiLabelScore(["Speech", "Dog", "Music"])
    m.add("Speech; Dog", ["Speech"], scores=[-1.0, -3.0, -9.0])
    m.add("Music", ["Dog", "Music"], scores=[-2.0, -1.0, -0.5])
    m.add("Speech", ["Speech"], scores=[-0.5, -4.0, -8.0])
    out = MultiLabelScore(["Speech", "Dog", "Music"]).merge(m.state()).summary()
    # Speech: positives at ranks 1, 2 -> 1; Dog: its one positive ranked 1st -> 1; Music: ranked 1st -> 1
    assert out["map"] == out["accuracy"] == pytest.approx(1.0)
    assert out["exact_match"] == pytest.approx(1 / 3)
    # TP speech x2, music; FP dog (1st); FN dog (2nd): micro 2*3/(6+1+1); macro speech 1, dog 0, music 1
    assert out["micro_f1"] == pytest.approx(6 / 8) and out["macro_f1"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def tiny():
    """A tiny random fused T5 (question at 0, an 'audio' of 3 tokens of 8 at 0), the byte tokenizer and a
    batch of two examples."""
    from fuse import FusionT5Config, FusionT5ForConditionalGeneration
    from pipelines.data.tokens import load_tokenizer

    torch.manual_seed(0)
    cfg = FusionT5Config.from_name("tiny", fusion_spec="0:question 0:audio", text_modalities=["question"],
                                   modality_dims={"audio": 8}, modality_lengths={"audio": 3})
    model = FusionT5ForConditionalGeneration(cfg).eval()
    tok = load_tokenizer("byt5")
    ids, mask = tok.encode_batch(["What is making the sound?", "What?"], max_length=32)
    inputs = {"question": (torch.as_tensor(ids), torch.as_tensor(mask)), "audio": torch.randn(2, 3, 8)}
    return model, tok, inputs


def test_candidate_likelihoods_are_the_training_loss_per_candidate(tiny):
    from pipelines.train.ranking import candidate_log_likelihoods, candidate_tokens

    model, tok, inputs = tiny
    labels = ["dog", "heart sounds, heartbeat", "cat purring"]
    cand, _ = candidate_tokens(tok, labels, 16)
    with torch.inference_mode():
        encoded = model.encode(inputs)
        got = candidate_log_likelihoods(model, encoded, cand)
        chunked = candidate_log_likelihoods(model, encoded, cand, max_logits=1)  # one candidate per pass
        for c, label in enumerate(labels):
            one = cand[c:c + 1].repeat(2, 1)
            n = int((one[0] != -100).sum())
            loss = torch.stack([model(modalities={k: v[b:b + 1] if not isinstance(v, tuple) else
                                                  (v[0][b:b + 1], v[1][b:b + 1]) for k, v in inputs.items()},
                                      labels=one[b:b + 1]).loss for b in range(2)])
            torch.testing.assert_close(got[:, c], -loss * n, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, chunked)
    assert got.shape == (2, 3)


class _Batches:
    """A stand-in for the eval loader: one batch of the two examples, as the stream makes it."""

    def __init__(self, inputs, references):
        self.batch = {"tokens": {"question": inputs["question"]}, "vectors": {"audio": inputs["audio"]},
                      "references": references, "groups": [{}, {}], "id": ["a", "b"]}
        self.loader = type("L", (), {"dataset": type("D", (), {"records": [{"references": r} for r in references],
                                                                "__len__": lambda self: 2})()})()

    def __iter__(self):
        yield self.batch


def test_evaluate_ranks_the_labels_in_the_order_given(tiny):
    """evaluate's top-1 and mAP are those of the likelihoods computed apart (the labels' order kept)."""
    from accelerate import Accelerator

    from pipelines.train.evaluate import CANDIDATE_MAX_TOKENS, evaluate
    from pipelines.train.ranking import candidate_log_likelihoods, candidate_tokens

    model, tok, inputs = tiny
    labels = ["dog", "heart sounds, heartbeat", "cat purring", "speech"]
    with torch.inference_mode():
        ll = candidate_log_likelihoods(model, model.encode(inputs),
                                       candidate_tokens(tok, labels, CANDIDATE_MAX_TOKENS)[0]).numpy()
    best = [labels[i] for i in ll.argmax(1)]
    accelerator = Accelerator(cpu=True)
    refs = [[best[0]], [next(x for x in labels if x != best[1])]]  # the first example's top-1 is right, not the 2nd's
    out = evaluate(model, _Batches(inputs, refs), tok, ["question", "audio"], accelerator, 8, progress=False,
                   metric="label", labels=labels)
    assert out["top1"] == 0.5 and out["count"] == 2
    refs = [["dog", "speech"], ["cat purring"]]
    out = evaluate(model, _Batches(inputs, refs), tok, ["question", "audio"], accelerator, 8, progress=False,
                   metric="multilabel", labels=labels)
    truth = np.array([[1, 0, 0, 1], [0, 0, 1, 0]], bool)
    assert out["map"] == pytest.approx(mean_average_precision(ll, truth))
    # without labels given, the scored side's references are the candidates (sorted)
    out = evaluate(model, _Batches(inputs, refs), tok, ["question", "audio"], accelerator, 8, progress=False,
                   metric="multilabel")
    sub = [labels.index(x) for x in sorted({"dog", "speech", "cat purring"})]
    assert out["map"] == pytest.approx(mean_average_precision(ll[:, sub], truth[:, sub]))


# ---- the README's recipes, as written, on the fixtures --------------------------------------------

RECIPES = "<!-- tests/test_avsets.py runs these recipes as written"


def recipe_commands() -> list:
    text = README.read_text()
    blocks = re.findall(r"```console\n(.*?)```", text[text.index(RECIPES):], flags=re.DOTALL)[:3]
    return [[line[2:] for line in block.splitlines() if line.startswith("$ ")] for block in blocks]


def run_in_process(command: str):
    """A README command (embed, vqa-data, fuse-sweep, fuse-eval) run in this process (imports once)."""
    from embed.cli import cli as embed_cli
    from pipelines.cli.eval import main as eval_cli
    from pipelines.cli.sweep import main as sweep_cli

    program, *args = shlex.split(command)
    cli = {"embed": embed_cli, "vqa-data": data_cli, "fuse-sweep": sweep_cli, "fuse-eval": eval_cli}[program]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, f"$ {command}\n{r.output[-3000:]}"
    return r.output


def test_the_readme_recipes_run_as_written(tmp_path, monkeypatch):
    from avsets_fixtures import write_fixtures

    write_fixtures(tmp_path)
    monkeypatch.chdir(tmp_path)
    vgg, audioset, valor = recipe_commands()
    assert vgg[0].startswith("embed vggsound/clips --modality audio") and vgg[-1].startswith("fuse-sweep")
    out = {command: run_in_process(command) for command in vgg + audioset + valor}

    def results(name):
        paths = sorted(Path(name).glob("runs/*/results.json"))
        assert [p.parent.name for p in paths] == ["f0-d2-pool_none-r0", "f4-d2-pool_none-r0"]
        return json.loads(paths[-1].read_text())

    r = results("runs/vggsound")  # no select side: the eval side picks the checkpoint, "last" is its score
    assert r["metric"] == "label" and r["last"]["count"] == 2 and 0 <= r["last"]["top1"] <= 1
    assert json.loads(Path("data/vggsound-qa/manifest.json").read_text())["labels"][0] == "heart sounds, heartbeat"
    r = results("runs/audioset")
    assert r["metric"] == "multilabel" and {"map", "micro_f1", "macro_f1", "exact_match"} <= set(r["last"])
    assert r["last"]["accuracy"] == r["last"]["map"] and r["last"]["count"] == 2
    assert r["config"]["max_answer_len"] == len("Domestic animals, pets; Dog; Squeak") + 1
    r = results("runs/valor")
    assert r["metric"] == "caption" and {"cider", "bleu4"} <= set(r["last"]) and r["last"]["count"] == 2
    skipped = [json.loads(line) for line in Path("data/audioset/skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == ["--ZhevVpy1s_000050"] and skipped[0]["reason"].startswith("failed (audio)")
    table = next(v for k, v in out.items() if k.startswith("fuse-eval") and "audioset" in k)
    assert "mAP" in table and "macro F1" in table
    assert AUDIOSET_CLIPS[0] in Path("data/audioset/clips.tsv").read_text()
