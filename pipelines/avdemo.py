"""The audio-visual worked example end to end on a CPU (``fuse-avdemo``): does the model need the image
and the sound together, and where should each join the T5?

avshapes clips (a frame and a sound each, :mod:`pipelines.data.avshapes`) -> ``embed`` the frames
(the shipped demo ViT) and ``embed --modality audio`` the sounds (the shipped demo AST) -> two LMDB
caches -> shards -> ``fuse-train --preset demo`` three times, side by side (one process each): with
the frame and the sound, with the frame alone, with the sound alone (the question text always) ->
accuracy by what each question needs. Every stage skips what an earlier run of the same command
finished, so a killed demo resumes."""

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from fuse import FusionSpec

from .train.config import TrainConfig

DEMO_AST = "ast_sounds_demo"
# (name, --fuse): the image and the sound join before block 0 with the question (early fusion);
# `fuse-sweep --fuse-grid` asks where each should join
RUNS = (("image+audio", "0:question 0:image 0:audio"), ("image", "0:question 0:image"),
        ("audio", "0:question 0:audio"))
NEEDS = ("sound", "image", "both")
LR, POOL = 1e-3, "audio:mean:1"  # the sound mean-pooled to one token


def run_avdemo(out: Path, clips: int, steps: int, seed: int, echo, parallel: int = 1) -> dict:
    """Data, both caches, shards, then the demo preset with the frame and the sound, and with each alone.

    Args:
        out: the working folder; stages an earlier run finished are skipped.
        clips: synthetic clips (7 questions each; a fifth of the clips are the eval side).
        steps: training steps of each model.
        seed: seeds the data and the trainings.
        echo: called with one progress line per stage.
        parallel: trainings at once, each in its own process with the CPUs shared out among them
            (1: one after another in this process, with the default threads).

    Returns:
        ``{"results": {run name: results.json}, "timings": {stage: seconds}}``.
    """
    from embed import EmbedConfig, embed
    from embed.registry import DEMO_VIT

    from .data.avshapes import write_avshapes
    from .data.example import read_dataset_info
    from .data.shards import MANIFEST, write_qa_shards
    from .errors import PipelineError
    from .train.loop import finished_results, train

    out.mkdir(parents=True, exist_ok=True)
    data, qa = out / "avshapes", out / "qa"
    caches = {"image": out / "cache" / "image", "audio": out / "cache" / "audio"}
    timings = {}

    t = time.perf_counter()
    if (data / "dataset.json").is_file():
        info = read_dataset_info(data)
        if (info.get("clips"), info.get("seed")) != (clips, seed):  # its caches and runs are of that data
            raise PipelineError(f"{out} holds the demo of --clips {info.get('clips')} --seed {info.get('seed')}, "
                                f"not --clips {clips} --seed {seed}: give another --out, or the same flags to resume")
    else:
        write_avshapes(data, clips=clips, seed=seed)
    timings["data"] = time.perf_counter() - t
    echo(f"1/4 avshapes data: {data} ({timings['data']:.0f} s)")

    for field, source, config in (
            ("image", data / "frames", dict(model=DEMO_VIT, pretrained=True, batch_size=256)),
            ("audio", data / "clips", dict(modality="audio", model=DEMO_AST, batch_size=128))):
        t = time.perf_counter()
        s = embed(EmbedConfig(images=[str(source)], out=str(caches[field]), progress=False, **config))
        timings[f"embed {field}"] = time.perf_counter() - t
        echo(f"2/4 embed {field}: {s.embedded} embedded, {s.skipped} already cached, {s.failed} failed -> "
             f"{caches[field]} ({timings[f'embed {field}']:.0f} s)")

    t = time.perf_counter()
    if not (qa / MANIFEST).is_file():
        write_qa_shards(data, qa, train_splits=["train"], eval_splits=["val"], seed=seed)
    timings["shards"] = time.perf_counter() - t
    echo(f"3/4 shards: {qa} ({timings['shards']:.0f} s)")

    results, todo = {}, []
    for name, fuse in RUNS:
        finished = finished_results(out / "runs" / name)
        if finished is not None:
            results[name], timings[name] = finished, 0.0
            echo(f"4/4 fuse-train {name} ({fuse}): {_needs_text(finished['last'])} (finished earlier)")
        else:
            todo.append((name, fuse))
    parallel = max(1, min(parallel, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // parallel)
    configs = {name: run_config(fuse, caches, qa, out / "runs" / name, steps, seed,
                                threads=threads if parallel > 1 else None, progress=parallel == 1)
               for name, fuse in todo}
    if todo:
        echo(f"4/4 fuse-train: {len(todo)} models, {parallel} at a time"
             + (f", {threads} torch thread(s) each" if parallel > 1 else ""))
    t0 = time.perf_counter()
    if parallel == 1:
        for name, _ in todo:
            results[name] = train(configs[name])
            timings[name] = time.perf_counter() - t0
            _echo_run(echo, name, results[name], timings[name])
            t0 = time.perf_counter()
    else:
        # One process per model (spawned: no forked torch state), a core each: on a small CPU two
        # one-thread trainings side by side do more steps per second than one two-thread training.
        with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_in_child, configs[name]): name for name, _ in todo}
            for future in as_completed(futures):
                name = futures[future]
                results[name] = future.result()
                timings[name] = time.perf_counter() - t0
                _echo_run(echo, name, results[name], timings[name])
    return {"results": results, "timings": timings}


def sweep_command(out: Path, steps: int) -> str:
    """The ``fuse-sweep`` that asks where the image and the sound should join, with the demo's settings."""
    return (f"fuse-sweep --shards {out / 'qa'} --cache image={out / 'cache' / 'image'} "
            f"--cache audio={out / 'cache' / 'audio'} --fuse 0:question --fuse-grid \"image=0,2,4 audio=0,2,4\" "
            f"--preset demo --pool {POOL} --positions image --lr {LR:g} --steps {steps} "
            f"--executor local --parallel 2 --out {out / 'sweep'}")


def _train_in_child(cfg: TrainConfig) -> dict:
    """``train`` in a spawned process. A spawned child inherits "spawn" as its start method, which
    would spawn the stream's workers too (a fresh interpreter and torch import each, ~15 s): they
    fork, as under ``fuse-train``."""
    from .train.loop import train

    if "fork" in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("fork", force=True)
    return train(cfg)


def _echo_run(echo, name: str, result: dict, seconds: float):
    echo(f"4/4 fuse-train {name} ({result['config']['fuse']}): {_needs_text(result['last'])} ({seconds:.0f} s)")


def run_config(fuse: str, caches: dict, qa: Path, run: Path, steps: int, seed: int, **flags) -> TrainConfig:
    """The demo preset for one of :data:`RUNS`: the sound mean-pooled to one token (its 24 tokens say
    one thing: which voice, how many beeps, how high; unpooled, the model with both learned the image
    questions far later), the frame's tokens with their positions (the "where" questions), lr 1e-3.
    The README's worked example has the trials behind these choices."""
    fused = FusionSpec.coerce(fuse).modalities()
    used = {m: str(c) for m, c in caches.items() if m in fused}
    return TrainConfig.resolve("demo", shards=str(qa), caches=used, out=str(run), fuse=fuse,
                               positions="image" if "image" in used else "",
                               pool=POOL if "audio" in used else "", lr=LR, steps=steps,
                               eval_every=steps, eval_limit=0, seed=seed,
                               resume=(run / "checkpoints" / "last" / "trainer_state.json").is_file(), **flags)


def _needs_text(metrics: dict) -> str:
    needs = metrics.get("by_group", {}).get("needs", {})
    return ", ".join(f"{k} {100 * needs[k]['accuracy']:.1f}%" for k in NEEDS if k in needs) + \
        f"; all {100 * metrics['accuracy']:.1f}%"


def table(out: Path, results: dict) -> str:
    """Accuracy of each model by what the questions need, and what both together add on ``both``."""
    rows = [("model", "--fuse", *(f"needs {k}" for k in NEEDS), "all", "steps/s")]
    for name, _ in RUNS:
        r = results[name]
        needs = r["last"].get("by_group", {}).get("needs", {})
        rows.append((name, r["config"]["fuse"], *(f"{100 * needs[k]['accuracy']:.1f}%" if k in needs else "-"
                                                  for k in NEEDS),
                     f"{100 * r['last']['accuracy']:.1f}%", f"{r['steps_per_s']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    both = {name: results[name]["last"]["by_group"]["needs"]["both"]["accuracy"] for name, _ in RUNS}
    single = max(both["image"], both["audio"])
    lines += ["", f"on the questions that need both, the image and the sound together score "
                  f"{100 * (both['image+audio'] - single):+.1f} points over the best single modality "
                  f"(accuracy, exact match, eval side)",
              f"where should each join? {sweep_command(out, results['image+audio']['config']['steps'])}",
              f"logs: tensorboard --logdir {out / 'runs'}"]
    return "\n".join(lines)
