"""fuse-train and fuse-eval on real data: shapes images -> the shipped demo ViT -> LMDB cache ->
WebDataset shards -> the fused T5 (tiny preset). Everything runs for real on the CPU."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipelines.cli.eval import main as eval_main
from pipelines.cli.train import main as train_main
from pipelines.data.shards import shard_paths, write_qa_shards
from pipelines.data.stream import read_records
from pipelines.errors import PipelineError
from pipelines.train.config import TrainConfig
from pipelines.train.loop import TrainingDiverged, train
from store import CacheReader, CacheWriter

DEMO_VIT = "vit_shapes_patch16_48"


@pytest.fixture(scope="module")
def data(vqa_data):
    return vqa_data(60, 3)


def tiny(data, out, **kw):
    base = dict(shards=str(data / "qa"), caches={"image": str(data / "cache")}, out=str(out), t5="tiny",
                tokenizer="words", fuse="0:question 0:image", steps=30, batch_size=16, eval_batch_size=64,
                eval_every=15, lr=3e-3, warmup=0.0, num_workers=0, progress=False, log_every=5)
    base.update(kw)
    return TrainConfig(**base)


def weights(run_dir, which="last"):
    return load_file(str(Path(run_dir) / "checkpoints" / which / "model.safetensors"))


def test_short_run_learns_and_writes_every_artifact(data, tmp_path):
    r = train(tiny(data, tmp_path / "run", steps=120, eval_every=60, lr=1e-2))
    first, last = r["history"][0], r["history"][-1]
    # The majority answer of the training side, scored on the eval side: what a model that learned nothing gets.
    from collections import Counter

    from pipelines.data.shards import shard_paths
    from pipelines.data.stream import read_records
    from pipelines.metrics.vqa import VQAScore, target_answer

    majority = Counter(target_answer(x["references"]) for x in read_records(shard_paths(data / "qa", "train")))
    score = VQAScore()
    for x in read_records(shard_paths(data / "qa", "eval")):
        score.add(majority.most_common(1)[0][0], x["references"], x["groups"]["answer_type"])
    assert last["accuracy"] > score.summary()["accuracy"], (last, score.summary())
    assert r["best"]["accuracy"] >= last["accuracy"] and first["step"] == 60 and last["step"] == 120
    run = tmp_path / "run"
    for f in ("results.json", "config.json", "checkpoints/last/model.safetensors", "checkpoints/last/fuse_run.json",
              "checkpoints/last/tokenizer/tokenizer.json", "checkpoints/best/model.safetensors"):
        assert (run / f).is_file(), f
    assert list((run / "tb").glob("events.out.tfevents.*"))
    saved = json.loads((run / "results.json").read_text())
    assert saved["steps"] == 120 and saved["flops_per_step"] > 0 and saved["config"]["fuse"] == "0:question 0:image"
    by_question = saved["last"]["by_question_type"]  # the shapes data's types, summing to the whole
    assert {"how many", "is there a"} <= set(by_question) and sum(m["count"] for m in by_question.values()) == last["count"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    losses = [e.value for e in ea.Scalars("train/loss")]
    assert losses[-1] < losses[0] / 2, losses  # the loss falls
    assert {"train/lr", "eval/accuracy", "speed/steps_per_s", "speed/samples_per_s"} <= set(ea.Tags()["scalars"])


def test_resume_continues_exactly(data, tmp_path):
    """A run stopped at step 15 and resumed equals the same run done in one go. The stopped run writes
    a results.json marked stopped, which the resume that finishes it replaces."""
    whole = train(tiny(data, tmp_path / "whole"))
    assert whole["stopped"] is False
    train(tiny(data, tmp_path / "parts", stop_at=15))
    assert json.loads((tmp_path / "parts/checkpoints/last/trainer_state.json").read_text())["step"] == 15
    stopped = json.loads((tmp_path / "parts/results.json").read_text())
    assert stopped["stopped"] is True and stopped["steps"] == 15 and [h["step"] for h in stopped["history"]] == [15]
    assert stopped["last"]["accuracy"] == whole["history"][0]["accuracy"] and stopped["config"]["stop_at"] == 15
    with pytest.raises(PipelineError, match="holds the checkpoint of an unfinished run .*: pass --resume to continue it"):
        train(tiny(data, tmp_path / "parts"))  # a plain rerun would overwrite the checkpoint at its first eval
    assert json.loads((tmp_path / "parts/checkpoints/last/trainer_state.json").read_text())["step"] == 15
    resumed = train(tiny(data, tmp_path / "parts", resume=True))
    assert resumed["steps"] == whole["steps"] == 30
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert [h["accuracy"] for h in resumed["history"]] == [h["accuracy"] for h in whole["history"]]
    final = json.loads((tmp_path / "parts/results.json").read_text())
    assert final["stopped"] is False and final["steps"] == 30 and final["history"] == resumed["history"]

    # Killed after its last checkpoint, before results.json: a resume trains no step, only writes it.
    (tmp_path / "parts/results.json").unlink()
    again = train(tiny(data, tmp_path / "parts", resume=True))
    assert again["stopped"] is False and again["history"] == resumed["history"] and again["steps_per_s"] is None
    assert json.loads((tmp_path / "parts/results.json").read_text())["best"] == resumed["best"]
    with pytest.raises(PipelineError, match="is at step 30 of 30: the run is finished"):
        train(tiny(data, tmp_path / "parts", resume=True))


def folder_state(path) -> dict:
    """Every file and folder under ``path``: relative name -> sha256 of the contents (None: a folder)."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(Path(path).rglob("*"))}


def test_a_refused_resume_changes_nothing_in_the_run_folder(data, tmp_path):
    """A --resume with other settings than its checkpoint's is refused (exit 2, naming the flags) before
    anything is written: no new config.json, TensorBoard file or checkpoint; so is a finished run's (exit 1)."""
    run = tmp_path / "run"
    base = ["--shards", data / "qa", "--t5", "tiny", "--tokenizer", "words", "--steps", "30", "--eval-every", "15",
            "--batch-size", "16", "--lr", "3e-3", "--warmup", "0", "--num-workers", "0", "--out", run]
    r = cli(*base, "--cache", f"image={data / 'cache'}", "--stop-at", "15")
    assert r.exit_code == 0, r.output
    shutil.copytree(data / "cache", tmp_path / "moved-cache")
    before = folder_state(run)
    assert "config.json" in before and "checkpoints/last/model.safetensors" in before
    # Another cache path, more steps and another learning rate: what the rewritten config.json used to say.
    other = [{"30": "40", "3e-3": "5e-3"}.get(a, a) if isinstance(a, str) else a for a in base]
    r = cli(*other, "--cache", f"image={tmp_path / 'moved-cache'}", "--resume")
    last = run / "checkpoints" / "last"
    assert usage_error(r) == (
        f"Error: --resume: the checkpoint {last} was trained with other settings (--cache: {{'image': "
        f"'{data / 'cache'}'}} there, {{'image': '{tmp_path / 'moved-cache'}'}} now; --steps: 30 there, 40 now; "
        "--lr: 0.003 there, 0.005 now): resume with its own settings, or start a new run (--overwrite or another "
        "--out)\n")
    assert folder_state(run) == before
    # With its own settings it goes on (also with --threads, which computes the same), then is finished.
    r = cli(*base, "--cache", f"image={data / 'cache'}", "--resume", "--threads", "1")
    assert r.exit_code == 0, r.output
    finished = folder_state(run)
    assert finished != before and json.loads((run / "results.json").read_text())["steps"] == 30
    r = cli(*base, "--cache", f"image={data / 'cache'}", "--resume")
    assert r.exit_code == 1 and r.output.endswith(
        f"Error: --resume: {last} is at step 30 of 30: the run is finished, there is nothing to continue\n"), r.output
    assert folder_state(run) == finished


def test_a_decoder_deeper_than_the_preset_trains_evaluates_saves_and_reloads(data, tmp_path):
    """--decoder-layers 6 on the tiny preset (4 encoder, 2 decoder layers) builds 6 random blocks;
    generation used to size its cache by the encoder's 4 layers and fail at the first eval
    (IndexError: list index out of range). A pretrained decoder is only ever cut: more is refused."""
    from transformers import T5Config, T5ForConditionalGeneration

    r = train(tiny(data, tmp_path / "deep", decoder_layers=6, steps=6, eval_every=3, eval_limit=32))
    assert [h["step"] for h in r["history"]] == [3, 6] and r["last"]["count"] >= 32
    saved = json.loads((tmp_path / "deep/checkpoints/last/config.json").read_text())
    assert saved["num_decoder_layers"] == 6 and saved["num_layers"] == 4
    assert {k.split(".")[2] for k in weights(tmp_path / "deep") if k.startswith("decoder.block.")} == \
        {str(i) for i in range(6)}
    from pipelines.train.checkpoint import load_checkpoint

    model, *_ = load_checkpoint(tmp_path / "deep")
    assert len(model.decoder.block) == 6
    res = CliRunner().invoke(eval_main, [str(tmp_path / "deep"), "--json", "--limit", "32"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["accuracy"] == pytest.approx(r["best"]["accuracy"])

    # A pretrained T5 with 2 decoder blocks: 3 is refused before anything is written, naming the range.
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=4,
                                             num_decoder_layers=2, num_heads=4, decoder_start_token_id=0))
    t5.save_pretrained(tmp_path / "t5")
    out = tmp_path / "pretrained"
    r = cli("--shards", data / "qa", "--cache", f"image={data / 'cache'}", "--t5", tmp_path / "t5", "--tokenizer",
            "words", "--steps", "2", "--num-workers", "0", "--decoder-layers", "3", "--out", out)
    assert usage_error(r) == "Error: --decoder-layers 3: the decoder has 2 blocks (1..2)\n"
    assert not out.exists()


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(data, tmp_path):
    cfg = tiny(data, tmp_path / "nan", lr=1e6, clip=0.0, warmup=40, steps=40, eval_every=2)
    with pytest.raises(TrainingDiverged, match=r"the loss became (nan|inf) at step (\d+): stopping") as e:
        train(cfg)
    bad_step = int(str(e.value).split(" at step ")[1].split(":")[0])
    state = json.loads((tmp_path / "nan/checkpoints/last/trainer_state.json").read_text())
    assert 0 < state["step"] < bad_step
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "nan").values())


def test_eval_limit_scores_exactly_that_many_questions(data, tmp_path):
    """--eval-limit 20 with eval batches of 16 used to score 32 (whole batches); fuse-eval --limit too."""
    r = train(tiny(data, tmp_path / "run", steps=2, eval_every=1, eval_limit=20, eval_batch_size=16))
    assert [h["count"] for h in r["history"]] == [20, 20]
    res = CliRunner().invoke(eval_main, [str(tmp_path / "run"), "--limit", "20", "--batch-size", "16", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["count"] == 20


def test_the_question_only_baseline_is_one_flag(data, tmp_path):
    """The quickstart's comparison from the command line: --fuse 0:question, no --cache. The demo
    preset's image positions and cache expectations apply only when the image is fused."""
    out = tmp_path / "q"
    r = cli("--preset", "demo", "--shards", data / "qa", "--fuse", "0:question", "--lr", "2e-3", "--steps", "2",
            "--eval-every", "2", "--num-workers", "0", "--out", out)
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert (config["fuse"], config["positions"], config["caches"], config["expect"]) == ("0:question", "", {}, {})
    assert json.loads((out / "results.json").read_text())["last"]["count"] == 60  # the whole eval side
    model_config = json.loads((out / "checkpoints/last/config.json").read_text())
    assert model_config["modality_dims"] == {} and model_config["modality_positions"] == []
    # a --positions given as such is still checked against --fuse
    r = cli("--preset", "demo", "--shards", data / "qa", "--fuse", "0:question", "--positions", "image",
            "--out", tmp_path / "p")
    assert usage_error(r) == "Error: --positions image: not a vector modality of --fuse 0:question (no --cache image=PATH)\n"


def test_fuse_eval_scores_a_vqa_split_and_writes_the_results_file(data, tmp_path):
    """--split reads a split's questions file, scores all of it, and --results-file writes the evaluation
    server's format; a questions file without annotations (test-dev) is answered, not scored."""
    train(tiny(data, tmp_path / "run", steps=10, eval_every=10, lr=1e-2))
    run = str(tmp_path / "run")
    res = CliRunner().invoke(eval_main, [run, "--split", "train", "--results-file", str(tmp_path / "train.json"),
                                         "--json"])
    assert res.exit_code == 0, res.output
    scored = json.loads(res.output[res.output.index("{"):])
    questions = json.loads((data / "shapes/v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]
    assert scored["count"] == scored["answered"] == len(questions) == 300  # both sides of the shards: all of it
    assert scored["scored"] == "train split" and scored["results_file"] == str(tmp_path / "train.json")
    results = json.loads((tmp_path / "train.json").read_text())
    assert isinstance(results, list) and [set(r) for r in results] == [{"question_id", "answer"}] * 300
    assert [r["question_id"] for r in results] == [q["question_id"] for q in questions]
    assert all(type(r["question_id"]) is int and type(r["answer"]) is str for r in results)
    assert (tmp_path / "train.json").read_text().startswith('[{"question_id": 1000, "answer": "')
    # The same questions as a test-dev file: no annotations file, images not needed (the cache has them).
    (tmp_path / "vqa").mkdir()
    test_dev = {"info": {}, "task_type": "Open-Ended", "questions": questions[:37]}
    (tmp_path / "vqa/v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps(test_dev))
    res = CliRunner().invoke(eval_main, [run, "--split", "test-dev", "--vqa-dir", str(tmp_path / "vqa"),
                                         "--results-file", str(tmp_path / "out/test-dev.json")])
    assert res.exit_code == 0, res.output
    assert res.output.endswith("37 questions answered (test-dev split: no annotations, not scored)\n")
    assert f"37 answers (test-dev split) -> {tmp_path / 'out/test-dev.json'}" in res.output
    assert json.loads((tmp_path / "out/test-dev.json").read_text()) == results[:37]
    # what does not go together: exit 2
    res = CliRunner().invoke(eval_main, [run, "--split", "val", "--side", "eval"])
    assert usage_error(res) == "Error: --side eval and --split val: score a side of the shards or a VQA split, not both\n"
    res = CliRunner().invoke(eval_main, [run, "--vqa-dir", str(tmp_path / "vqa")])
    assert usage_error(res) == "Error: --vqa-dir: only with --split (the shards' sides are read from --shards)\n"
    res = CliRunner().invoke(eval_main, [run, "--split", "val"])
    assert res.exit_code == 1 and "v2_OpenEnded_mscoco_val2014_questions.json: no such file" in res.output


def test_vqa_v2_protocol_picks_on_the_select_side_and_scores_all_of_val_once(vqa_v2, tmp_path):
    """Shards of VQA v2's protocol: the best checkpoint is picked on the select side (a slice of train),
    then the eval side (all of val) is scored once with it, as fuse-eval --split val scores it."""
    qa = tmp_path / "qa"
    write_qa_shards(vqa_v2 / "vqa", qa, train_splits=["train"], eval_splits=["val"], select_fraction=0.2,
                    images_root=vqa_v2 / "coco", min_shards=2)
    r = train(tiny(vqa_v2, tmp_path / "run", shards=str(qa), steps=20, eval_every=10, lr=1e-2))
    assert r["selection_side"] == "select" and [h["count"] for h in r["history"]] == [30, 30]  # 6 images
    assert r["eval"]["count"] == 50 and r["eval"]["step"] == r["best"]["step"]  # all 10 val images
    saved = json.loads((tmp_path / "run/results.json").read_text())
    assert saved["eval"] == r["eval"] and saved["stopped"] is False
    res = CliRunner().invoke(eval_main, [str(tmp_path / "run"), "--split", "val", "--json"])
    assert res.exit_code == 0, res.output
    by_fuse_eval = json.loads(res.output)
    assert by_fuse_eval["count"] == 50 and by_fuse_eval["accuracy"] == pytest.approx(r["eval"]["accuracy"])
    # the images under --images-root are where --image-source online finds them
    online = train(tiny(vqa_v2, tmp_path / "online", shards=str(qa), image_source="online", steps=2,
                        eval_every=2, eval_limit=8))
    assert online["eval"]["count"] == 50


def test_question_only_model_ignores_the_cache_values(data, tmp_path):
    # a preset's --positions image does not apply to a model without the image
    r = train(tiny(data, tmp_path / "q", fuse="0:question", positions="image", steps=10, eval_every=10))
    assert r["last"]["count"] > 0
    config = json.loads((tmp_path / "q/checkpoints/last/config.json").read_text())
    assert config["modality_dims"] == {} and config["modality_positions"] == []


def test_online_image_source_gives_the_cache_values(data):
    from pipelines.data.online import ImageEmbedder, load_vit

    with CacheReader(data / "cache") as r:
        e = ImageEmbedder(load_vit(r.meta.producer), data / "shapes")
        ids = ["1", "7", "60"]
        got = e(ids).numpy()
        for i, k in enumerate(ids):
            np.testing.assert_allclose(got[i], r[k].astype(np.float32), atol=2e-3, rtol=1e-3)


def test_online_training_runs(data, tmp_path):
    r = train(tiny(data, tmp_path / "online", image_source="online", steps=4, eval_every=4, eval_limit=16))
    assert r["steps"] == 4 and r["config"]["image_source"] == "online"


def test_fuse_eval_scores_a_checkpoint_and_answers_one_question(data, tmp_path):
    train(tiny(data, tmp_path / "run", steps=60, eval_every=60, lr=1e-2, positions="image"))
    res = CliRunner().invoke(eval_main, [str(tmp_path / "run"), "--limit", "-3"])
    assert res.exit_code == 2 and "Invalid value for '--limit': -3 is not in the range x>=0." in res.output
    res = CliRunner().invoke(eval_main, [str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    saved = json.loads((tmp_path / "run/results.json").read_text())["best"]
    assert d["count"] == saved["count"] and d["accuracy"] == pytest.approx(saved["accuracy"])
    # A cache that lacks one image: refused with a message, or its questions dropped with --allow-missing.
    with CacheReader(data / "cache") as src, CacheWriter(tmp_path / "partial", shape=src.meta.shape,
                                                         producer=src.meta.producer) as w:
        gone = sorted({r["vectors"]["image"] for r in read_records(shard_paths(data / "qa", "eval"))})[0]
        for key in src.keys():
            if key != gone:
                w.put(key, src[key])
    partial = [str(tmp_path / "run"), "--cache", f"image={tmp_path / 'partial'}", "--json"]
    res = CliRunner().invoke(eval_main, partial)
    assert res.exit_code == 1 and "lacks 1 of 12 ids" in res.output and "(--allow-missing)" in res.output
    res = CliRunner().invoke(eval_main, [*partial, "--allow-missing"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["count"] == saved["count"] - 5

    question = "What color is the circle?"
    image = data / "shapes/train2014/COCO_train2014_000000000001.jpg"
    res = CliRunner().invoke(eval_main, [str(tmp_path / "run"), "--image", str(image), "--question", question, "--json"])
    assert res.exit_code == 0, res.output
    answer = json.loads(res.output)["answer"]
    # --image and --question are short for --file image=PATH and --field question=TEXT
    res = CliRunner().invoke(eval_main, [str(tmp_path / "run"), "--file", f"image={image}", "--field",
                                         f"question={question}", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"question": question, "image": str(image), "answer": answer}
    # The same question answered from the cache's value of that image.
    from pipelines.data.tokens import decode_batch
    from pipelines.train.checkpoint import load_checkpoint

    model, run, tokenizer, _ = load_checkpoint(tmp_path / "run")
    assert model.encoder.adapters["image"].position_embedding.shape == (9, 32)  # reloaded with its positions
    ids, mask = tokenizer.encode_batch([question], max_length=128)
    with CacheReader(data / "cache") as r:
        image_tokens = torch.from_numpy(r["1"]).float()[None]
    out = model.generate(modalities={"question": (ids, mask), "image": image_tokens}, max_new_tokens=16)
    assert answer == decode_batch(tokenizer, out)[0] and answer


def cli(*args):
    return CliRunner().invoke(train_main, [str(a) for a in args])


def usage_error(r) -> str:
    """The message of a usage error (exit 2): click prints the usage line first."""
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Usage: ")
    return r.output.rsplit("\n\n", 1)[-1]


def test_cli_errors(data, tmp_path):
    base = ["--shards", data / "qa", "--t5", "tiny", "--tokenizer", "words", "--steps", "2", "--out", tmp_path / "x"]
    # Settings wrong as given exit 2, whether the config or the model finds them.
    r = cli(*base, "--cache", f"image={data / 'cache'}", "--fuse", "0:question 5:image")
    assert usage_error(r) == "Error: --fuse 5:image: the encoder has 4 layers (0..4)\n"
    r = cli(*base, "--cache", f"image={data / 'cache'}", "--fuse", "0:question 1:audio")
    assert usage_error(r) == (f"Error: --fuse 0:question 1:audio: the shards in {data / 'qa'} have no field 'audio' "
                              "(text fields: question; vector fields: image)\n")
    r = cli(*base, "--cache", f"image={data / 'cache'}", "--cache", f"audio={data / 'cache'}", "--fuse",
            "0:question 1:audio")
    assert usage_error(r) == (f"Error: --cache audio=PATH: the shards in {data / 'qa'} have no field 'audio', so no "
                              "id to look it up by (text fields: question; vector fields: image)\n")
    r = cli(*base, "--fuse", "0:question 1:image")  # a vector field of the data, without its cache
    assert usage_error(r) == (f"Error: --fuse 0:question 1:image: 'image' is a vector field of the shards in "
                              f"{data / 'qa'}: give its cache with --cache image=PATH\n")
    r = cli(*base, "--cache", f"image={data / 'cache'}", "--eval-limit", "-1")
    assert usage_error(r) == "Error: --eval-limit -1: must be 0 (all) or a positive integer\n"
    r = cli(*base, "--cache", f"image={data / 'cache'}", "--positions", "question")
    assert usage_error(r) == ("Error: --positions question: not a vector modality of --fuse 0:question 0:image "
                              "(no --cache question=PATH)\n")
    r = cli(*base, "--cache", f"image={data / 'cache'}", "--clip", "-1")
    assert usage_error(r) == "Error: --clip -1.0: must be a number >= 0 (0: off)\n"
    # What is found wrong in the data exits 1.
    # A cache that lacks most images.
    with CacheReader(data / "cache") as src, CacheWriter(tmp_path / "partial", shape=src.meta.shape,
                                                         producer=src.meta.producer) as w:
        w.put("1", src["1"])
    r = cli(*base, "--cache", f"image={tmp_path / 'partial'}")
    assert r.exit_code == 1 and "lacks 47 of 48 ids, needed by 235 of 240 records (e.g. 2, 3, 7, 9, 10, ...)" in r.output
    assert r.output.endswith("embed them, or allow missing ids (--allow-missing) to drop those records\n")
    # A cache that lacks one image of the eval side only: refused before the first step, not at the first eval.
    eval_only = ({r["vectors"]["image"] for r in read_records(shard_paths(data / "qa", "eval"))}
                 - {r["vectors"]["image"] for r in read_records(shard_paths(data / "qa", "train"))})
    gone = sorted(eval_only)[0]
    with CacheReader(data / "cache") as src, CacheWriter(tmp_path / "no-eval", shape=src.meta.shape,
                                                         producer=src.meta.producer) as w:
        for key in src.keys():
            if key != gone:
                w.put(key, src[key])
    r = cli(*base, "--cache", f"image={tmp_path / 'no-eval'}", "--eval-every", "1")
    assert r.exit_code == 1 and f"lacks 1 of 12 ids, needed by 5 of 60 records (e.g. {gone})" in r.output, r.output
    assert not (tmp_path / "x" / "checkpoints").exists() and not (tmp_path / "x" / "tb").exists()
    # A cache made by another model.
    with CacheWriter(tmp_path / "other", shape=(9, 192), producer={"model": "vit_base_patch16_224"}) as w:
        w.put("1", np.zeros((9, 192)))
    r = cli(*base, "--cache", f"image={tmp_path / 'other'}", "--preset", "demo")
    assert r.exit_code == 1
    assert "producer.model: cache has 'vit_base_patch16_224', expected 'vit_shapes_patch16_48'" in r.output
    r = cli(*base, "--cache", "image")
    assert usage_error(r) == "Error: --cache image: expected FIELD=PATH, e.g. --cache image=runs/cache\n"


def test_two_process_accelerate_launch(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Without CUDA, --multi_gpu starts the processes through torchrun and they join over gloo
    # (accelerate's --cpu launcher starts a single process unless MPI is set up).
    from test_embed_launch import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "pipelines.cli.train",
           "--shards", str(data / "qa"), "--cache", f"image={data / 'cache'}", "--t5", "tiny", "--tokenizer", "words",
           "--steps", "4", "--eval-every", "4", "--batch-size", "8", "--num-workers", "0", "--out", str(tmp_path / "ddp"),
           "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((tmp_path / "ddp/results.json").read_text())
    assert results["num_processes"] == 2 and results["steps"] == 4
    n_eval = sum(1 for _ in __import__("pipelines.data.stream", fromlist=["read_records"]).read_records(
        __import__("pipelines.data.shards", fromlist=["shard_paths"]).shard_paths(data / "qa", "eval")))
    assert results["last"]["count"] == n_eval  # every eval question scored once across both processes


def test_config_file_errors_and_flags_override_it(tmp_path):
    (tmp_path / "bad.json").write_text('{"steps": 3,}')
    r = CliRunner().invoke(train_main, ["--config", str(tmp_path / "bad.json"), "--shards", str(tmp_path)])
    assert usage_error(r).startswith(f"Error: --config {tmp_path / 'bad.json'}: not valid JSON (")
    (tmp_path / "bad.yaml").write_text("steps: [1\n")
    r = CliRunner().invoke(train_main, ["--config", str(tmp_path / "bad.yaml"), "--shards", str(tmp_path)])
    assert usage_error(r).startswith(f"Error: --config {tmp_path / 'bad.yaml'}: not valid YAML (")
    (tmp_path / "ok.yaml").write_text("steps: 7\nlr: 0.5\n")
    cfg = TrainConfig.resolve("demo", str(tmp_path / "ok.yaml"), lr=0.25)
    assert (cfg.steps, cfg.lr, cfg.fuse) == (7, 0.25, "0:question 2:image")
    for flag, value, message in (("--threads", "0", "must be a positive integer"),
                                 ("--stop-at", "-3", "must be a positive integer"),
                                 ("--warmup", "-0.1", "must be a fraction of the steps (< 1) or a number of steps")):
        r = CliRunner().invoke(train_main, ["--preset", "demo", "--shards", str(tmp_path), flag, value])
        assert usage_error(r) == f"Error: {flag} {float(value) if flag == '--warmup' else value}: {message}\n"


def test_a_presets_positions_and_expectations_apply_to_its_fused_fields_with_a_cache():
    """Without --cache a fused field is a text field: the demo preset still resolves (the quickstart
    reads its settings so), and the data's check asks for the cache (test_cli_errors)."""
    demo = TrainConfig.resolve("demo")
    assert (demo.fuse, demo.positions, demo.expect) == ("0:question 2:image", "", {})
    cached = TrainConfig.resolve("demo", caches={"image": "c"})
    assert cached.positions == "image" and list(cached.expect) == ["image"] and cached.position_modalities() == ["image"]
    assert TrainConfig.resolve("demo", caches={"image": "c"}, fuse="0:question").positions == ""


def test_a_checkpoint_left_as_old_by_a_kill_between_renames_is_found(tmp_path):
    """replace_dir renames last -> last.old, then last.tmp -> last: killed in between, only last.old
    is whole, and --resume and fuse-eval must find it."""
    from pipelines.files import replace_dir
    from pipelines.train.checkpoint import has_checkpoint, resolve_checkpoint

    last = tmp_path / "run" / "checkpoints" / "last"
    tmp = last.with_name("last.tmp")
    tmp.mkdir(parents=True)
    for name in ("config.json", "fuse_run.json", "trainer_state.json"):
        (tmp / name).write_text("{}")
    replace_dir(tmp, last)
    assert has_checkpoint(last) and resolve_checkpoint(tmp_path / "run") == last
    last.rename(last.with_name("last.old"))  # the state between the two renames
    assert has_checkpoint(last) and resolve_checkpoint(tmp_path / "run") == last.with_name("last.old")


@pytest.mark.parametrize("setting, value, message", [
    ("dropout", 1.0, "--dropout 1.0: must be a number in [0, 1.0)"),
    ("weight_decay", -0.1, "--weight-decay -0.1: must be a number >= 0 (0: off)"),
    ("clip", "x", "--clip x: must be a number >= 0 (0: off)"),
])
def test_dropout_clip_and_weight_decay_are_validated(setting, value, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{setting: value})
    assert str(err.value) == message
