"""fuse-sweep on real data: shapes images -> the shipped demo ViT -> LMDB cache -> shards -> a 2×2 grid
of tiny fused T5s trained for real on the CPU; then the summary, the figures, reruns and broken runs;
then a grid over two vector modalities' layers with their ablations.

The second vector modality, ``depth``, is the image cache under another name: the shapes examples get
a ``depth`` vector field holding their image id (``two_fields``), so two ``--cache`` entries on one
cache make a two-modality sweep without a second dataset."""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.cli.sweep import main
from pipelines.errors import SweepError
from pipelines.sweep.figures import make_figures
from pipelines.sweep.plan import GridPoint, SweepConfig, plan
from pipelines.sweep.report import COLUMNS, RunRecord, pareto_front, report, summarise
from pipelines.sweep.run import prepare_shards, run_sweep
from pipelines.train.config import TrainConfig
from pipelines.train.loop import TrainingDiverged, train

RUNS = ["f0-d1-pool_none-r0", "f0-d2-pool_none-r0", "f4-d1-pool_none-r0", "f4-d2-pool_none-r0"]
SUMMARY = ("summary.json", "summary.csv", "summary.md")


@pytest.fixture(scope="module")
def data(vqa_data):
    return vqa_data(40, 5)


def flags(data, out, *extra):
    return ["--shards", str(data / "qa"), "--cache", f"image={data / 'cache'}", "--fuse-layers", "0,4",
            "--decoder-layers", "1,2", "--t5", "tiny", "--tokenizer", "words", "--steps", "10", "--eval-every", "5",
            "--batch-size", "16", "--lr", "1e-2", "--warmup", "0", "--num-workers", "0", "--out", str(out), *extra]


def config(data, out, **kw):
    train = dict(t5="tiny", tokenizer="words", steps=10, eval_every=5, batch_size=16, lr=1e-2, warmup=0.0,
                 num_workers=0, progress=False)
    return SweepConfig(out=str(out), shards=str(data / "qa"), caches={"image": str(data / "cache")},
                       fuse_layers=(0, 4), decoder_layers=(1, 2), train=train, **kw)


@pytest.fixture(scope="module")
def sweep(data):
    """The 2×2 sweep, run once through the CLI; tests that change it work on a copy."""
    out = data / "sweep"
    result = CliRunner().invoke(main, flags(data, out))
    assert result.exit_code == 0, result.output
    return out


def copy_of(sweep, tmp_path):
    shutil.copytree(sweep, tmp_path / "sweep")
    return tmp_path / "sweep"


def test_the_sweep_trains_every_grid_point_and_writes_every_artifact(sweep):
    assert sorted(p.name for p in (sweep / "runs").iterdir()) == RUNS
    for name in RUNS:
        run = sweep / "runs" / name
        for f in ("results.json", "config.json", "checkpoints/last/model.safetensors", "checkpoints/best/model.safetensors"):
            assert (run / f).is_file(), (name, f)
        assert list((run / "tb").glob("events.out.tfevents.*"))
        cfg = json.loads((run / "results.json").read_text())["config"]
        layer, depth = int(name[1]), int(name[4])
        assert (cfg["fuse"], cfg["decoder_layers"], cfg["seed"], cfg["steps"]) == (f"0:question {layer}:image", depth, 0, 10)
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(p["fuse_layer"], p["decoder_layers"], p["pool"], p["repeats"]) for p in summary["points"]] == [
        (0, 1, "none", 1), (0, 2, "none", 1), (4, 1, "none", 1), (4, 2, "none", 1)]
    for p in summary["points"]:
        assert p["steps_per_s"] > 0 and p["samples_per_s"] > 0 and p["params"] > 0 and p["flops_per_step"] > 0
        assert 0 <= p["best_accuracy_pct"] <= 100 and p["best_accuracy_pct"] >= p["last_accuracy_pct"]
        assert p["best_accuracy_pct_std"] is None  # one repeat: no spread
    # Late fusion (4) runs the image tokens through no encoder block: fewer FLOPs than early fusion (0).
    flops = {(p["fuse_layer"], p["decoder_layers"]): p["flops_per_step"] for p in summary["points"]}
    assert flops[(4, 1)] < flops[(0, 1)] and flops[(0, 1)] < flops[(0, 2)]
    assert any(p["pareto"] for p in summary["points"])
    csv_lines = (sweep / "summary.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(COLUMNS) and len(csv_lines) == 5
    md = (sweep / "summary.md").read_text()
    assert "| fusion layer | decoder layers |" in md and md.count("\n| 4 | ") == 2
    assert summary["figures"] == ["figures/accuracy_heatmap.png", "figures/fusion_layer.png",
                                  "figures/accuracy_vs_flops.png", "figures/curves.png"]
    for f in summary["figures"]:
        assert (sweep / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["failed"] == [] and summary["broken"] == []
    assert "run 4/4 f4-d2-pool_none-r0" in (sweep / "sweep.log").read_text()


def test_report_from_the_finished_runs_equals_the_one_the_sweep_wrote(sweep):
    before = {f: (sweep / f).read_bytes() for f in SUMMARY}
    pngs = {p.name: p.read_bytes() for p in (sweep / "figures").iterdir()}
    result = CliRunner().invoke(main, ["report", str(sweep)])
    assert result.exit_code == 0, result.output
    assert {f: (sweep / f).read_bytes() for f in SUMMARY} == before
    assert {p.name: p.read_bytes() for p in (sweep / "figures").iterdir()} == pngs
    assert "| 0 | 1 | none | 1 |" in result.output and "4 finished run(s)" in result.output


def test_a_rerun_redoes_only_what_is_missing(data, sweep, tmp_path, caplog):
    out = copy_of(sweep, tmp_path)
    killed, never_started = out / "runs" / RUNS[1], out / "runs" / RUNS[2]
    (killed / "results.json").unlink()  # killed mid-run: checkpoints and logs, no results
    (killed / "stale.txt").write_text("from the killed run")
    shutil.rmtree(never_started)
    kept = {name: (out / "runs" / name / "results.json").stat().st_mtime_ns for name in (RUNS[0], RUNS[3])}
    assert [s for _, s, _ in plan(config(data, out))[1]] == ["finished", "broken", "todo", "finished"]

    with caplog.at_level(logging.INFO, logger="pipelines.sweep.run"):
        summary = run_sweep(config(data, out))
    assert summary["ran"] == RUNS[1:3] and summary["redone"] == [RUNS[1]]
    assert summary["skipped"] == [RUNS[0], RUNS[3]]
    assert {n: (out / "runs" / n / "results.json").stat().st_mtime_ns for n in kept} == kept
    assert not (killed / "stale.txt").exists() and (killed / "results.json").is_file()
    assert f"redo {RUNS[1]}: no results.json" in caplog.text
    assert summary["finished"] == 4 and summary["broken"] == []


def test_a_killed_run_goes_on_from_its_checkpoint_unless_its_settings_differ(data, sweep, tmp_path, caplog):
    out = copy_of(sweep, tmp_path)
    name, cfg = RUNS[1], config(data, out)
    whole = json.loads((out / "runs" / name / "results.json").read_text())
    shutil.rmtree(out / "runs" / name)
    base, todo = plan(cfg)
    point = next(p for p, _, _ in todo if p.name == name)
    train(dataclasses.replace(cfg.run_config(base, point), stop_at=5))  # what a run killed after step 5 leaves
    assert [s for p, s, _ in plan(cfg)[1] if p.name == name] == ["broken"]
    with caplog.at_level(logging.INFO, logger="pipelines.sweep.run"):
        summary = run_sweep(cfg)
    assert summary["resumed"] == [name] and summary["redone"] == [] and summary["ran"] == [name]
    assert f"resume {name} from its last checkpoint: results.json is marked stopped at step 5 (--stop-at)" in caplog.text
    results = json.loads((out / "runs" / name / "results.json").read_text())
    assert results["steps"] == 10 and [h["step"] for h in results["history"]] == [5, 10]
    assert [h["accuracy"] for h in results["history"]] == [h["accuracy"] for h in whole["history"]]

    # Started with another learning rate: done again from step 0, not continued.
    (out / "runs" / name / "results.json").unlink()
    train(dataclasses.replace(cfg.run_config(base, point), stop_at=5, lr=5e-3, overwrite=True))
    summary = run_sweep(cfg)
    assert summary["resumed"] == [] and summary["redone"] == [name]
    assert json.loads((out / "runs" / name / "config.json").read_text())["lr"] == 1e-2


def test_a_broken_run_is_reported_not_averaged_in(sweep, tmp_path, caplog):
    out = copy_of(sweep, tmp_path)
    runs = out / "runs"
    original = json.loads((runs / RUNS[0] / "results.json").read_text())
    # A second repeat of the first grid point with 50% best / 40% last accuracy: averaged in.
    shutil.copytree(runs / RUNS[0], runs / "f0-d1-pool_none-r1")
    second = {**original, "best": {**original["best"], "accuracy": 0.5},
              "last": {**original["last"], "accuracy": 0.4}, "config": {**original["config"], "seed": 1}}
    (runs / "f0-d1-pool_none-r1" / "results.json").write_text(json.dumps(second))
    # A third whose results.json is cut short, and one without a best accuracy: reported, not averaged in.
    shutil.copytree(runs / RUNS[0], runs / "f0-d1-pool_none-r2")
    (runs / "f0-d1-pool_none-r2" / "results.json").write_text(json.dumps(original)[:200])
    shutil.copytree(runs / RUNS[0], runs / "f0-d1-pool_none-r3")
    (runs / "f0-d1-pool_none-r3" / "results.json").write_text(json.dumps({**original, "best": None}))

    with caplog.at_level(logging.WARNING):
        summary = report(out)
    row = summary["points"][0]
    assert (row["fuse_layer"], row["decoder_layers"], row["repeats"]) == (0, 1, 2)
    assert row["runs"] == "f0-d1-pool_none-r0 f0-d1-pool_none-r1"
    assert row["best_accuracy_pct"] == pytest.approx((100 * original["best"]["accuracy"] + 50) / 2, abs=1e-4)
    assert row["last_accuracy_pct"] == pytest.approx((100 * original["last"]["accuracy"] + 40) / 2, abs=1e-4)
    assert row["best_accuracy_pct_std"] == pytest.approx(abs(50 - 100 * original["best"]["accuracy"]) / 2 ** 0.5, abs=1e-3)
    broken = {b["run"]: b["reason"] for b in summary["broken"]}
    assert broken.keys() == {"f0-d1-pool_none-r2", "f0-d1-pool_none-r3"}
    assert broken["f0-d1-pool_none-r2"].startswith("results.json is unreadable")
    assert broken["f0-d1-pool_none-r3"] == "'best' is missing"
    assert "broken run f0-d1-pool_none-r2: results.json is unreadable" in caplog.text
    md = (out / "summary.md").read_text()
    assert "## Broken runs (not in the table)" in md and "- `f0-d1-pool_none-r3`: 'best' is missing" in md


def test_a_diverged_run_is_recorded_then_kept_unless_retried(data, sweep, tmp_path):
    out = copy_of(sweep, tmp_path)
    shutil.rmtree(out / "runs" / RUNS[3])

    def diverge(cfg, **kwargs):
        Path(cfg.out).mkdir(parents=True)
        raise TrainingDiverged("the loss became nan at step 3")

    summary = run_sweep(config(data, out), train_fn=diverge)
    assert summary["newly_failed"] == [RUNS[3]] and summary["ran"] == []
    assert summary["failed"] == [{"run": RUNS[3], "reason": "diverged: the loss became nan at step 3"}]
    assert len(summary["points"]) == 3
    again = run_sweep(config(data, out), train_fn=diverge)  # kept: not tried again
    assert again["skipped"] == RUNS and again["newly_failed"] == []
    retried = run_sweep(config(data, out, retry_failed=True), train_fn=diverge)
    assert retried["redone"] == [RUNS[3]] and retried["newly_failed"] == [RUNS[3]]


def test_a_point_that_raises_is_recorded_as_failed_and_the_sweep_goes_on(data, sweep, tmp_path):
    """A real error in one run (here its checkpoint, found damaged when the sweep resumes it; before, an
    IndexError at the first eval of a deep decoder) is that run's result: failed.json with the error,
    the next points train, the summary is written and the command exits 1 naming the run."""
    out = copy_of(sweep, tmp_path)
    name, cfg = RUNS[1], config(data, out)
    shutil.rmtree(out / "runs" / name)
    base, todo = plan(cfg)
    point = next(p for p, _, _ in todo if p.name == name)
    train(dataclasses.replace(cfg.run_config(base, point), stop_at=5))  # a killed run, to be resumed
    (out / "runs" / name / "checkpoints" / "last" / "model.safetensors").write_bytes(b"\0" * 64)  # damaged
    shutil.rmtree(out / "runs" / RUNS[2])  # a point still to do after the failing one
    result = CliRunner().invoke(main, flags(data, out))
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == f"Error: 1 run(s) failed: {name} (see {out}/summary.md)"
    reason = json.loads((out / "runs" / name / "failed.json").read_text())["reason"]
    assert reason.startswith("SafetensorError: Error while deserializing header"), reason
    assert f"failed: {name}: {reason}" in result.output
    assert (out / "runs" / RUNS[2] / "results.json").is_file()  # the sweep went on
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [{"run": name, "reason": reason}] and summary["finished"] == 3
    assert [(p["fuse_layer"], p["decoder_layers"]) for p in summary["points"]] == [(0, 1), (4, 1), (4, 2)]
    log = (out / "sweep.log").read_text()
    assert f"run {name} failed: {reason}" in log and "Traceback (most recent call last)" in log
    # A rerun keeps the failure (and exits 0: nothing failed this time); --retry-failed redoes the run.
    again = CliRunner().invoke(main, flags(data, out))
    assert again.exit_code == 0 and f"skip {name}: failed before" in (out / "sweep.log").read_text()
    retried = CliRunner().invoke(main, flags(data, out, "--retry-failed"))
    assert retried.exit_code == 0, retried.output
    assert (out / "runs" / name / "results.json").is_file() and not (out / "runs" / name / "failed.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--fuse-layers", "0,5"],
     "--fuse-layers 5: the encoder of --t5 tiny has 4 layers, so a fusion layer is in 0..4 (0 = early, 4 = late fusion)"),
    (["--pool", "none,attention:20"],
     "--pool attention:20: the image cache holds 9 tokens per item; pooling keeps at most that many"),
    (["--pool", "foo:3"], "--pool foo:3: unknown pooling 'foo' (none, mean, max, attention)"),
    (["--decoder-layers", "0,1"], "--decoder-layers 0: the decoder needs at least 1 block"),
    (["--fuse-layers", "0,x"], "Invalid value for '--fuse-layers': 0,x: expected comma-separated integers, e.g. 0,2,4"),
    (["--repeats", "0"], "--repeats 0: must be at least 1"),
])
def test_a_bad_grid_exits_2_before_anything_is_written(data, tmp_path, extra, message):
    result = CliRunner().invoke(main, flags(data, tmp_path / "out", *extra))
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == f"Error: {message}"
    assert not (tmp_path / "out").exists()


def test_other_settings_into_a_finished_sweep_are_refused(data, sweep):
    result = CliRunner().invoke(main, flags(data, sweep, "--lr", "5e-3"))
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: {sweep / 'runs' / RUNS[0]} finished with other settings (lr: 0.01 there, 0.005 now): "
        "sweep into another --out, or delete that run to redo it")


def test_dry_run_and_report_errors(data, sweep, tmp_path):
    result = CliRunner().invoke(main, ["run", *flags(data, sweep, "--fuse-layers", "0,2,4", "--dry-run")])
    assert result.exit_code == 0, result.output
    assert "f2-d1-pool_none-r0\ttodo" in result.output and "f0-d1-pool_none-r0\tfinished" in result.output
    assert result.output.splitlines()[-1] == "2 of 6 run(s) to do (10 steps each)"
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == f"Error: {tmp_path}: no runs/ folder (not a sweep directory, or no run started yet)"


def test_the_cpu_grid_and_its_overrides():
    cfg = SweepConfig.resolve("cpu", out="x", shards="qa", caches={"image": "c"}, train={"steps": 20, "lr": None})
    assert (cfg.fuse_layers, cfg.decoder_layers, cfg.pools, cfg.repeats) == ((0, 2, 4), (1, 2), ("none",), 2)
    assert cfg.train == {"preset": "demo", "steps": 20, "eval_every": 50, "lr": 1e-3}  # None: not given
    assert [p.name for p in cfg.points(2)][:3] == ["f0-d1-pool_none-r0", "f0-d1-pool_none-r1", "f0-d2-pool_none-r0"]
    assert GridPoint((("image", 3),), 2, (("image", "attention:14"),), 1).name == "f3-d2-pool_attention14-r1"


def test_vqa_folder_shards_are_written_once(data, tmp_path):
    cfg = SweepConfig(out=str(tmp_path), vqa=str(data / "shapes"), caches={"image": "c"}, fuse_layers=(0,))
    prepare_shards(cfg)
    manifest = (tmp_path / "qa" / "manifest.json").stat().st_mtime_ns
    prepare_shards(cfg)
    assert (tmp_path / "qa" / "manifest.json").stat().st_mtime_ns == manifest
    assert json.loads((tmp_path / "qa" / "manifest.json").read_text())["split_by"] == "image"


def test_vqa_folder_split_by_question_and_a_split_that_differs(data, tmp_path):
    """--split-by question: a random 80% of the questions (the thesis' split), so images fall on both
    sides; shards split otherwise are refused, not silently reused."""
    cfg = SweepConfig(out=str(tmp_path), vqa=str(data / "shapes"), split_by="question", caches={"image": "c"},
                      fuse_layers=(0,))
    prepare_shards(cfg)
    manifest = json.loads((tmp_path / "qa" / "manifest.json").read_text())
    assert manifest["split_by"] == "question"
    assert manifest["train"]["images"] + manifest["eval"]["images"] > manifest["images"]
    by_image = SweepConfig(out=str(tmp_path), vqa=str(data / "shapes"), caches={"image": "c"}, fuse_layers=(0,))
    with pytest.raises(SweepError, match=r"^--split-by image: .*/qa was split by question; sweep into another --out"):
        prepare_shards(by_image)
    with pytest.raises(ValueError, match=r"^--split-by question: only with --vqa"):
        SweepConfig(out="x", shards="qa", split_by="question", caches={"image": "c"}, fuse_layers=(0,))


# ---- several modalities: --fuse, --fuse-grid, --ablate ---------------------------------------------

@pytest.fixture(scope="module")
def two_fields(data, tmp_path_factory):
    """The shapes data as examples with a second vector field, ``depth``, keyed like the image, sharded
    as ``data``'s are."""
    from pipelines.data.example import write_examples
    from pipelines.data.shards import write_qa_shards
    from pipelines.data.vqa import read_vqa

    root = tmp_path_factory.mktemp("two-fields")
    examples = [r.to_example() for r in read_vqa(data / "shapes", check_images=False)]
    write_examples(root / "examples", "train", [dataclasses.replace(e, vectors={**e.vectors, "depth": e.vectors["image"]})
                                                for e in examples])
    (root / "examples" / "dataset.json").write_text('{"format": "where-to-fuse/examples", "metric": "vqa"}')
    write_qa_shards(root / "examples", root / "qa", min_shards=2, seed=0)
    (root / "cache").symlink_to(data / "cache")
    return root


def grid_flags(data, out, *extra):
    """Two vector modalities on one cache (see the module docstring); no --fuse-layers. ``data``: the
    folder of ``two_fields``' shards."""
    return ["--shards", str(data / "qa"), "--cache", f"image={data / 'cache'}", "--cache", f"depth={data / 'cache'}",
            "--t5", "tiny", "--tokenizer", "words", "--steps", "6", "--eval-every", "3", "--batch-size", "16",
            "--lr", "1e-2", "--warmup", "0", "--num-workers", "0", "--decoder-layers", "1", "--out", str(out), *extra]


MULTI = {  # run -> its --fuse: the 2×2 grid over the image's and depth's layers, then each without one of them
    "image0-depth0-d1-pool_none-r0": "0:question 0:image 0:depth",
    "image0-depth4-d1-pool_none-r0": "0:question 0:image 4:depth",
    "image4-depth0-d1-pool_none-r0": "0:question 4:image 0:depth",
    "image4-depth4-d1-pool_none-r0": "0:question 4:image 4:depth",
    "no_image-depth0-d1-pool_none-r0": "0:question 0:depth",
    "image0-no_depth-d1-pool_none-r0": "0:question 0:image",
    "no_image-depth4-d1-pool_none-r0": "0:question 4:depth",
    "image4-no_depth-d1-pool_none-r0": "0:question 4:image",
}


@pytest.fixture(scope="module")
def multi(two_fields):
    """``--fuse-grid "image=0,4 depth=0,4" --ablate``, run once through the CLI."""
    out = two_fields / "multi"
    result = CliRunner().invoke(main, grid_flags(two_fields, out, "--fuse-grid", "image=0,4 depth=0,4", "--ablate"))
    assert result.exit_code == 0, result.output
    return out, result.output


def test_fuse_grid_with_ablate_trains_each_combination_and_each_modality_removed(multi):
    out, _ = multi
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(MULTI)
    for name, fuse in MULTI.items():
        config = json.loads((out / "runs" / name / "results.json").read_text())["config"]
        assert (config["fuse"], config["pool"], config["decoder_layers"], config["steps"]) == (fuse, "", 1, 6)
        assert set(config["caches"]) == {"image", "depth"}  # the same settings for every run, ablations too
    log = (out / "sweep.log").read_text()
    assert "run 5/8 no_image-depth0-d1-pool_none-r0: --fuse '0:question 0:depth'" in log


def test_the_summary_has_a_modality_axis_and_the_ablation_rows(multi):
    out, output = multi
    summary = json.loads((out / "summary.json").read_text())
    assert summary["swept"] == ["image", "depth"] and summary["finished"] == 8
    assert [(p["layers"].get("image"), p["layers"].get("depth"), p["ablated"]) for p in summary["points"]] == [
        (0, 0, ""), (0, 4, ""), (4, 0, ""), (4, 4, ""), (0, None, "depth"), (4, None, "depth"),
        (None, 0, "image"), (None, 4, "image")]
    assert not any(p["pareto"] for p in summary["points"] if p["ablated"])
    points = {p["fuse"]: p for p in summary["points"]}
    ablation = summary["ablation"]
    assert [(a["fuse"], a["removed"], a["fuse_without"]) for a in ablation] == [
        ("0:question,image,depth", "image", "0:question,depth"), ("0:question,image,depth", "depth", "0:question,image"),
        ("0:question,image 4:depth", "image", "0:question 4:depth"),
        ("0:question,image 4:depth", "depth", "0:question,image"),
        ("0:question,depth 4:image", "image", "0:question,depth"),
        ("0:question,depth 4:image", "depth", "0:question 4:image"),
        ("0:question 4:image,depth", "image", "0:question 4:depth"),
        ("0:question 4:image,depth", "depth", "0:question 4:image")]
    for a in ablation:
        without, full = points[a["fuse_without"]], points[a["fuse"]]
        assert a["best_accuracy_pct"] == without["best_accuracy_pct"] and a["runs"] == without["runs"]
        assert a["full_best_accuracy_pct"] == full["best_accuracy_pct"]
        assert a["best_drop_pct"] == pytest.approx(full["best_accuracy_pct"] - without["best_accuracy_pct"], abs=1e-3)
    assert summary["figures"] == ["figures/accuracy_heatmap_image_depth.png", "figures/accuracy_vs_flops.png",
                                  "figures/curves.png", "figures/ablation.png"]
    for f in summary["figures"]:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["fuse", "layer_image", "layer_depth", "fuse_layer"] and len(header) == len(COLUMNS) + 2
    md = (out / "summary.md").read_text()
    assert "| fusion (--fuse) | without |" in md and "## Ablation: each vector modality removed in turn" in md
    assert "| `0:question,image 4:depth` | 1 | none | depth |" in md
    assert "Ablation:" in output and "![ablation](figures/ablation.png)" in md
    # The report from the run folders alone draws the same.
    before = {f: (out / f).read_bytes() for f in SUMMARY}
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert {f: (out / f).read_bytes() for f in SUMMARY} == before


def test_a_pooling_has_one_label_whichever_modality_joins_first(multi, tmp_path):
    """The same per-modality pooling in runs that join image and depth in either order: one grid
    point's pooling, one label (else the report splits it and draws a figure per order)."""
    from pipelines.sweep.report import read_run

    out, _ = multi
    labels = set()
    for name in ("image0-depth4-d1-pool_none-r0", "image4-depth0-d1-pool_none-r0"):
        results = json.loads((out / "runs" / name / "results.json").read_text())
        results["config"]["pool"] = "image:none depth:mean:1"
        run = tmp_path / name
        shutil.copytree(out / "runs" / name, run)
        (run / "results.json").write_text(json.dumps(results))
        labels.add(read_run(run).pool)
    assert labels == {"image:none depth:mean:1"}


def test_fuse_base_with_a_vector_modality_and_the_plan_of_its_ablations(two_fields, tmp_path):
    """A modality fixed in --fuse is ablated too; runs that differ only in the removed modality share
    their ablation; --dry-run prints each run's --fuse."""
    result = CliRunner().invoke(main, grid_flags(two_fields, tmp_path / "out", "--fuse", "0:question 2:depth", "--fuse-grid",
                                                 "image=0,4", "--ablate", "--dry-run"))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "f0-d1-pool_none-r0\ttodo\t--fuse '0:question 2:depth 0:image'",
        "f4-d1-pool_none-r0\ttodo\t--fuse '0:question 2:depth 4:image'",
        "f0-no_depth-d1-pool_none-r0\ttodo\t--fuse '0:question 0:image'",
        "no_image-d1-pool_none-r0\ttodo\t--fuse '0:question 2:depth'",
        "f4-no_depth-d1-pool_none-r0\ttodo\t--fuse '0:question 4:image'",
        "5 of 5 run(s) to do (6 steps each)"]
    result = CliRunner().invoke(main, grid_flags(two_fields, tmp_path / "out", "--fuse-grid", "image=0,2 depth=0,2,4",
                                                 "--dry-run"))
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.output.splitlines()[:-1]] == [
        f"image{i}-depth{d}-d1-pool_none-r0" for i in (0, 2) for d in (0, 2, 4)]


def test_pooling_per_modality_and_an_ablation_that_leaves_nothing():
    cfg = SweepConfig(out="x", shards="qa", caches={"image": "c", "depth": "c"}, fuse_grid={"image": (0, 4)},
                      fuse="0:question 2:depth", pools=("image:none", "image:attention:4", "depth:mean:2"))
    # Every combination of the modalities' lists; depth (fixed in --fuse) first, as it joins first.
    assert [(p.name, p.pool) for p in cfg.points(1)] == [
        ("f0-d1-pool_depth_mean2_image_none-r0", "depth:mean:2 image:none"),
        ("f0-d1-pool_depth_mean2_image_attention4-r0", "depth:mean:2 image:attention:4"),
        ("f4-d1-pool_depth_mean2_image_none-r0", "depth:mean:2 image:none"),
        ("f4-d1-pool_depth_mean2_image_attention4-r0", "depth:mean:2 image:attention:4")]
    base = TrainConfig(shards="", caches={"image": "c", "depth": "c"}, fuse="0:question")
    assert [cfg.run_config(base, p).pool for p in cfg.points(1)][:2] == ["depth:mean:2", "depth:mean:2 image:attention:4"]
    alike = SweepConfig(out="x", shards="qa", caches={"image": "c", "depth": "c"}, fuse_grid="image=0 depth=0",
                        pools=("none", "attention:4"))
    assert [p.pool for p in alike.points(1)] == ["none", "attention:4"]  # every vector modality alike
    nothing = SweepConfig(out="x", shards="qa", caches={"image": "c"}, fuse="", fuse_grid="image=0,4", ablate=True)
    assert [p.name for p in nothing.points(1)] == ["f0-d1-pool_none-r0", "f4-d1-pool_none-r0"]
    assert nothing.skipped_ablations() == ["--ablate: 0:image without image fuses nothing; not trained",
                                           "--ablate: 4:image without image fuses nothing; not trained"]


@pytest.mark.parametrize("extra, message", [
    (["--fuse-grid", "image=0,5 depth=0"],
     "--fuse-grid image=5: the encoder of --t5 tiny has 4 layers, so a fusion layer is in 0..4 (0 = early, 4 = late fusion)"),
    (["--fuse", "0:question 6:depth", "--fuse-grid", "image=0"],
     ("--fuse 0:question 6:depth: 6:depth: the encoder of --t5 tiny has 4 layers, so a fusion layer is in 0..4 "
      "(0 = early, 4 = late fusion)")),
    (["--fuse", "0:question 2:image", "--fuse-grid", "image=0,4 depth=0"],
     ("--fuse-grid image=0,4: 'image' is in --fuse 0:question 2:image too; a modality joins once, so fix it there "
      "or sweep it here")),
    (["--fuse-grid", "image=0,4", "--fuse-layers", "0,4"],
     "--fuse-layers: give the grid as --fuse-grid or as --modality/--fuse-layers, not both"),
    (["--fuse-grid", "image=0,x"], "--fuse-grid image=0,x: the layers are comma-separated integers, e.g. image=0,2,4"),
    (["--fuse-grid", "image=0 image=4"], "--fuse-grid image=4: 'image' is given twice"),
    (["--fuse-grid", "image=0", "--pool", "none,image:mean:2"],
     ("--pool none,image:mean:2: give every setting as TYPE[:LENGTH] (every vector modality alike) or every one as "
      "MODALITY:TYPE[:LENGTH], not both")),
    (["--fuse-grid", "image=0", "--pool", "audio:mean:2"],
     "--pool audio:mean:2: 'audio' is not a vector modality of the sweep (image)"),
    (["--fuse-grid", "image=0 depth=0", "--pool", "depth:attention:20"],
     "--pool depth:attention:20: the depth cache holds 9 tokens per item; pooling keeps at most that many"),
    (["--fuse", "", "--fuse-grid", "question=0"],
     ("--fuse-grid 'question=0': nothing to sweep: no modality of it or of --fuse '' has a --cache (given: image, "
      "depth); e.g. --fuse-grid image=0,2,4 --cache image=PATH (or --fuse-layers 0,2,4, or --grid cpu)")),
])
def test_a_bad_fuse_grid_exits_2_naming_the_flag(two_fields, tmp_path, extra, message):
    result = CliRunner().invoke(main, grid_flags(two_fields, tmp_path / "out", *extra))
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == f"Error: {message}"
    assert not (tmp_path / "out").exists()


# ---- the figures and the summary on made-up results (no training) ---------------------------------

def record(L, d, pool, seed=0, acc=0.5, speed=2.0, flops=1e9):
    return RunRecord(name=f"f{L}-d{d}-pool_{pool}-r{seed}", fuse_layer=L, decoder_layers=d, pool=pool, seed=seed,
                     best_accuracy=acc, best_step=10, last_accuracy=acc - 0.1, last_step=20, steps_per_s=speed,
                     samples_per_s=64 * speed, params=1000, flops_per_step=flops, history=[(10, acc), (20, acc - 0.1)])


def test_pareto_front_keeps_the_points_nothing_beats():
    assert pareto_front([(1, 0.5), (2, 0.6), (3, 0.55), (2, 0.4), (1, 0.5)]) == {0, 1, 4}


def test_pooling_figures_and_skipped_figures(tmp_path, caplog):
    records = [record(L, 2, pool, acc=0.3 + 0.05 * L + 0.01 * i, speed=1 + i, flops=(4 - L + 1) * 1e9 / (i + 1))
               for L in (0, 4) for i, pool in enumerate(["none", "mean:4", "mean:2", "attention:4"])]
    rows = summarise(records)
    with caplog.at_level(logging.INFO, logger="pipelines.sweep.figures"):
        written = make_figures(rows, records, tmp_path, encoder_layers=4, full_length=9)
    names = [p.name for p in written]
    assert "pooling_mean.png" in names and "pooling_attention.png" in names  # attention: 4 and 9 (unpooled)
    assert "fusion_layer_pool_mean4.png" in names and "accuracy_vs_flops.png" in names
    assert not any(n.startswith("accuracy_heatmap") for n in names)  # one decoder depth
    assert "figure accuracy_heatmap_pool_none skipped: the grid has 2 fusion layer(s) and 1 decoder depth(s)" in caplog.text
    one = [record(2, 1, "none")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.sweep.figures"):
        assert [p.name for p in make_figures(summarise(one), one, tmp_path / "one")] == ["curves.png"]
    assert "figure fusion_layer skipped: a single fusion layer (2)" in caplog.text
    assert "figure accuracy_vs_flops skipped: every grid point has the same FLOPs per step" in caplog.text


def test_the_summary_and_the_figures_name_the_runs_metric(sweep, tmp_path):
    """Runs on label or caption data report their own metric, not 'VQA accuracy'."""
    from pipelines.sweep.figures import metric_labels

    out = copy_of(sweep, tmp_path)
    for results in (out / "runs").glob("*/results.json"):
        results.write_text(json.dumps({**json.loads(results.read_text()), "metric": "exact"}))
    summary = report(out, figures=False)
    assert summary["metric"] == "exact" and {r["metric"] for r in summary["runs"]} == {"exact"}
    assert "Accuracy: exact match with the label on the eval side" in (out / "summary.md").read_text()
    assert metric_labels("caption") == ("CIDEr-D (×100)", "CIDEr-D") and metric_labels("vqa")[1] == "VQA accuracy"
