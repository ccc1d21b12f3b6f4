"""The main job end to end on the built-in synthetic shapes data, on a CPU (``fuse-quickstart``).

shapes images + questions (VQA v2 layout) -> ``embed`` (the shipped demo ViT) -> LMDB cache ->
QA shards -> ``fuse-train --preset demo`` twice (image fused as the preset says; question only) -> a table.
Every stage skips what an earlier run of the same command finished, so a killed quickstart resumes.
"""

import time
from pathlib import Path

from .train.config import TrainConfig

QUESTION_ONLY_LR = 2e-3  # the question-only model learns its answer priors in a few hundred steps at this rate


def run_quickstart(out: Path, images: int, steps: int, question_only_steps: int, seed: int, echo) -> dict:
    """Data, embedding, shards, then the demo preset with the image fused and on the question alone.

    Args:
        out: the working folder; stages an earlier run finished are skipped.
        images: synthetic images (5 questions each).
        steps, question_only_steps: training steps of the fused and the question-only model.
        seed: seeds the data, the split and both trainings.
        echo: called with one progress line per stage.

    Returns:
        ``{"results": {"fused": ..., "question_only": ...}, "timings": {stage: seconds}}``.
    """
    from embed import EmbedConfig, embed
    from embed.registry import DEMO_VIT

    from .data.shapes import write_shapes
    from .data.shards import MANIFEST, write_qa_shards
    from .train.loop import finished_results, train

    out.mkdir(parents=True, exist_ok=True)
    shapes, cache, qa = out / "shapes", out / "cache", out / "qa"
    timings = {}

    t = time.perf_counter()
    if not (shapes / "v2_mscoco_train2014_annotations.json").is_file():
        write_shapes(shapes, images=images, seed=seed)
    timings["data"] = time.perf_counter() - t
    echo(f"1/4 shapes data: {shapes} ({timings['data']:.0f} s)")

    t = time.perf_counter()
    s = embed(EmbedConfig(images=[str(shapes / "train2014")], out=str(cache), model=DEMO_VIT, pretrained=True,
                          batch_size=256, progress=False))
    timings["embed"] = time.perf_counter() - t
    echo(f"2/4 embed: {s.embedded} embedded, {s.skipped} already cached, {s.failed} failed -> {cache} "
         f"({timings['embed']:.0f} s)")

    t = time.perf_counter()
    if not (qa / MANIFEST).is_file():
        write_qa_shards(shapes, qa, seed=seed)
    timings["shards"] = time.perf_counter() - t
    echo(f"3/4 shards: {qa} ({timings['shards']:.0f} s)")

    results = {}
    demo = TrainConfig.resolve("demo")
    runs = (("fused", demo.fuse, steps, demo.lr), ("question_only", "0:question", question_only_steps, QUESTION_ONLY_LR))
    for name, fuse, n, lr in runs:
        run = out / "runs" / name
        t = time.perf_counter()
        finished = finished_results(run)
        if finished is not None:
            results[name] = finished
        else:
            cfg = TrainConfig.resolve("demo", shards=str(qa), caches={"image": str(cache)}, out=str(run), fuse=fuse,
                                      lr=lr, steps=n, eval_every=n, eval_limit=0, seed=seed,  # 0: the whole eval side
                                      resume=(run / "checkpoints" / "last" / "trainer_state.json").is_file())
            results[name] = train(cfg)
        timings[name] = time.perf_counter() - t
        echo(f"4/4 fuse-train {name} ({fuse}): VQA accuracy {100 * results[name]['last']['accuracy']:.1f}% "
             f"({timings[name]:.0f} s)")
    return {"results": results, "timings": timings}


def table(out: Path, results: dict) -> str:
    """The quickstart's closing table: both models' accuracy by answer type, the image's gain, where to look."""
    rows = [("model", "VQA acc", "exact", "yes/no", "number", "other", "steps/s", "run")]
    for name, label in (("fused", f"fused ({results['fused']['config']['fuse']})"), ("question_only", "question only")):
        r = results[name]
        last = r["last"]
        kinds = last["by_answer_type"]
        rows.append((label, f"{100 * last['accuracy']:.1f}%", f"{100 * last['exact_match']:.1f}%",
                     *(f"{100 * kinds[k]['accuracy']:.1f}%" if k in kinds else "-" for k in ("yes/no", "number", "other")),
                     f"{r['steps_per_s']:.2f}", str(out / "runs" / name)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    gain = 100 * (results["fused"]["last"]["accuracy"] - results["question_only"]["last"]["accuracy"])
    lines += ["", f"the image is worth {gain:+.1f} points of VQA accuracy (eval side, official metric)",
              f"logs: tensorboard --logdir {out / 'runs'}",
              f"checkpoint: {out / 'runs' / 'fused' / 'checkpoints' / 'best'}  (fuse-eval {out / 'runs' / 'fused'} --image "
              f"IMAGE --question TEXT)"]
    return "\n".join(lines)
