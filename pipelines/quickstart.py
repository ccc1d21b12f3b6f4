"""``fuse-quickstart``: the main job end to end on the built-in synthetic shapes data, on a CPU.

shapes images + questions (VQA v2 layout) -> ``embed`` (the shipped demo ViT) -> LMDB cache ->
QA shards -> ``fuse-train --preset demo`` twice (image fused late; question only) -> a table.
Every stage skips what an earlier run of the same command finished, so a killed quickstart resumes.
"""

import json
import logging
import time
from pathlib import Path

import click

from .train_config import TrainConfig

DEMO_VIT = "vit_shapes_patch16_48"


def run_quickstart(out: Path, images: int, steps: int, question_only_steps: int, seed: int, echo) -> dict:
    from embed import EmbedConfig, embed

    from .shapes import write_shapes
    from .shards import MANIFEST, write_qa_shards
    from .train import train

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
    # Each model at its best measured rate: the question-only model reaches its answer priors in a
    # few hundred steps at 2e-3 (43.4% on 2,048 eval questions; 3,000 steps at the demo's 2.5e-4: 42.2%).
    runs = (("fused", demo.fuse, steps, demo.lr), ("question_only", "0:question", question_only_steps, 2e-3))
    for name, fuse, n, lr in runs:
        run = out / "runs" / name
        t = time.perf_counter()
        if (run / "results.json").is_file():
            results[name] = json.loads((run / "results.json").read_text())
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


@click.command(context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), default="quickstart", help="Working folder.")
@click.option("--images", type=int, default=15000, help="Synthetic images (5 questions each).")
@click.option("--steps", type=int, default=TrainConfig.resolve("demo").steps, help="Training steps of the fused model.")
@click.option("--question-only-steps", type=int, default=500,
              help="Steps of the question-only model (it learns the answer priors in a few hundred, at lr 2e-3).")
@click.option("--seed", type=int, default=0)
def main(out, images, steps, question_only_steps, seed):
    """Run the main job end to end on the built-in shapes data and print accuracy with and without the image.

    Stages: `vqa-data shapes`, `embed` (the shipped demo ViT), `vqa-data shards`, then `fuse-train
    --preset demo` with the image and on the question alone. Rerunning skips finished stages.

    Example:

        fuse-quickstart --out quickstart
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(out)
    t = time.perf_counter()
    from embed import EmbedError
    from fuse import FusionConfigError
    from store import StoreError

    from .errors import PipelineError

    try:
        done = run_quickstart(out, images, steps, question_only_steps, seed, click.echo)
    except (PipelineError, StoreError, EmbedError, FusionConfigError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo("")
    click.echo(table(out, done["results"]))
    click.echo(f"total {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
