"""The audio-visual worked example end to end on a CPU (``fuse-avdemo``): where should the image and
the sound join the T5?

avshapes clips (a frame and a sound each, :mod:`pipelines.data.avshapes`) -> ``embed`` the frames
(the shipped demo ViT) and ``embed --modality audio`` the sounds (the shipped demo AST) -> two LMDB
caches -> shards -> ``fuse-train --preset demo`` three times: with the frame and the sound, with the
frame alone, with the sound alone (the question text always) -> accuracy by what each question needs.
Every stage skips what an earlier run of the same command finished, so a killed demo resumes.
"""

import time
from pathlib import Path

from .train.config import TrainConfig

DEMO_AST = "ast_sounds_demo"
# (name, --fuse): the image and the sound join before block 0 with the question (early fusion);
# `fuse-sweep --fuse-grid` asks where each should join
RUNS = (("image+audio", "0:question 0:image 0:audio"), ("image", "0:question 0:image"),
        ("audio", "0:question 0:audio"))
NEEDS = ("sound", "image", "both")


def run_avdemo(out: Path, clips: int, steps: int, seed: int, echo) -> dict:
    """Data, both caches, shards, then the demo preset with the frame and the sound, and with each alone.

    Args:
        out: the working folder; stages an earlier run finished are skipped.
        clips: synthetic clips (6 questions each; a fifth of the clips are the eval side).
        steps: training steps of each model.
        seed: seeds the data and the trainings.
        echo: called with one progress line per stage.

    Returns:
        ``{"results": {run name: results.json}, "timings": {stage: seconds}}``.
    """
    from embed import EmbedConfig, embed
    from embed.registry import DEMO_VIT

    from .data.avshapes import write_avshapes
    from .data.shards import MANIFEST, write_qa_shards
    from .train.loop import finished_results, train

    out.mkdir(parents=True, exist_ok=True)
    data, qa = out / "avshapes", out / "qa"
    caches = {"image": out / "cache" / "image", "audio": out / "cache" / "audio"}
    timings = {}

    t = time.perf_counter()
    if not (data / "dataset.json").is_file():
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

    results = {}
    for name, fuse in RUNS:
        run = out / "runs" / name
        t = time.perf_counter()
        finished = finished_results(run)
        if finished is not None:
            results[name] = finished
        else:
            used = {m: str(c) for m, c in caches.items() if f":{m}" in fuse}
            cfg = TrainConfig.resolve("demo", shards=str(qa), caches=used, out=str(run), fuse=fuse,
                                      positions=" ".join(used), steps=steps, eval_every=steps, eval_limit=0,
                                      seed=seed, resume=(run / "checkpoints" / "last" / "trainer_state.json").is_file())
            results[name] = train(cfg)
        timings[name] = time.perf_counter() - t
        echo(f"4/4 fuse-train {name} ({fuse}): {_needs_text(results[name]['last'])} ({timings[name]:.0f} s)")
    return {"results": results, "timings": timings}


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
              f"where should each join? fuse-sweep --shards {out / 'qa'} --cache image={out / 'cache' / 'image'} "
              f"--cache audio={out / 'cache' / 'audio'} --fuse-grid \"image=0,2,4 audio=0,2,4\" --preset demo "
              f"--out {out / 'sweep'}",
              f"logs: tensorboard --logdir {out / 'runs'}"]
    return "\n".join(lines)
