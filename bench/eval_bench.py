"""Evaluation vs the training step of the demo preset, side by side: questions/s against samples/s.

Builds (or reuses, with ``--work``) the synthetic shapes data in the VQA v2 layout, its cache from the
shipped demo ViT, QA shards (80/20) and a demo-preset model trained for ``--train-steps`` (so that it
answers in a token or two, as a trained model does; an untrained one never stops before
``max_new_tokens``). Then times ``--rounds`` interleaved rounds (so that other load on the machine
hits every row alike) of:

- train step: the loop's step (forward, backward, AdamW) on the training stream, at the loop's torch
  threads (the CPUs left after the stream's workers), in samples/s as ``results.json`` counts them;
- fuse-eval, before: the evaluation as it was before issue 14 (``pipelines/train/evaluate.py`` at
  commit 2701a67, copied below): HF ``generate`` per batch, the eval stream in the run's DataLoader
  workers (2), torch's default threads (one per core);
- fuse-eval, now: :func:`pipelines.train.evaluate.score`, as the command runs it (the training
  step's threads: the cores left after the stream's workers);
- eval during training, before / now: at the loop's threads, the eval stream's workers started for
  each evaluation (before) or kept (now: ``persistent_workers``), the old evaluation against
  :func:`pipelines.train.evaluate.evaluate`.

Each eval row scores the same first ``--questions`` eval questions with the same checkpoint, and
must give the same accuracy (checked). Prints each round and the median, and each eval row's
median against the train step's.

Example:
    python bench/eval_bench.py                         # ~5 minutes on 2 CPU cores
    python bench/eval_bench.py --work /tmp/eval-bench --rounds 5
"""

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data.stream import eval_loader, open_caches  # noqa: E402
from pipelines.data.tokens import decode_batch  # noqa: E402
from pipelines.metrics.vqa import VQAScore  # noqa: E402
from pipelines.train.checkpoint import load_checkpoint  # noqa: E402
from pipelines.train.config import TrainConfig  # noqa: E402
from pipelines.train.evaluate import ScoreConfig, evaluate, run_config, score  # noqa: E402
from pipelines.train.model import make_optimizer, make_schedule, model_inputs  # noqa: E402
from pipelines.train.streams import batches, stream_configs  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # torch's own default, before anything sets it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="folder for the data and the model (kept and reused) [a temporary one]")
    p.add_argument("--images", type=int, default=2000, help="shapes images (5 questions each)")
    p.add_argument("--train-steps", type=int, default=300, help="steps of the model that is scored")
    p.add_argument("--questions", type=int, default=2048,
                   help="eval questions scored per row and round (a multiple of 128: the old evaluation scored whole batches)")
    p.add_argument("--steps", type=int, default=30, help="timed train steps per round")
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


def prepare(work: Path, images: int, train_steps: int) -> Path:
    """Data, cache, shards and a trained demo-preset run under ``work`` (each kept once made)."""
    from embed import EmbedConfig, embed
    from embed.registry import DEMO_VIT

    from pipelines.data.shapes import write_shapes
    from pipelines.data.shards import MANIFEST, write_qa_shards
    from pipelines.train.loop import finished_results, train

    if not (work / "shapes" / "v2_OpenEnded_mscoco_train2014_questions.json").is_file():
        write_shapes(work / "shapes", images=images, seed=0)
    embed(EmbedConfig(images=[str(work / "shapes" / "train2014")], out=str(work / "cache"), model=DEMO_VIT,
                      pretrained=True, batch_size=256, progress=False))
    if not (work / "qa" / MANIFEST).is_file():
        write_qa_shards(work / "shapes", work / "qa", seed=0)
    run = work / "run"
    if finished_results(run) is None:
        train(TrainConfig.resolve("demo", shards=str(work / "qa"), caches={"image": str(work / "cache")},
                                  out=str(run), steps=train_steps, eval_every=train_steps, overwrite=True,
                                  progress=False))
    return run


@torch.inference_mode()
def evaluate_before(model, loader, tokenizer, modalities, max_new_tokens, limit) -> dict:
    """The evaluation of commit 2701a67 (one process, no accelerate): generate per batch, stop after
    the batch that reaches ``limit`` (read from the example contract's batch: references, groups)."""
    model.eval()
    score_ = VQAScore()
    for batch in loader:
        ids = model.generate(modalities=model_inputs(batch, modalities, "cpu"), max_new_tokens=max_new_tokens,
                             num_beams=1, do_sample=False)
        score_.add_batch(decode_batch(tokenizer, ids), batch["references"],
                         [g.get("answer_type") or "all" for g in batch["groups"]],
                         [g.get("question_type", "") for g in batch["groups"]])
        if limit and len(score_) >= limit:
            break
    return score_.summary()


def main(argv=None) -> None:
    args = parse_args(argv)
    from accelerate import Accelerator

    from pipelines.train.loop import loss_function, make_accelerator, train_step

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="eval-bench-")
    work = Path(args.work or tmp.name)
    t = time.perf_counter()
    run_dir = prepare(work, args.images, args.train_steps)
    print(f"data, cache and a {args.train_steps}-step demo model in {work} ({time.perf_counter() - t:.0f} s)")

    model, run, tokenizer, _ = load_checkpoint(run_dir)
    cfg = run_config(run)
    modalities = model.config.fusion().modalities()
    n = args.questions
    loop_threads = cfg.cpu_threads()  # make_accelerator's, one process

    # The train step, as the loop runs it, on its own copy of the model.
    train_cfg = dataclasses.replace(cfg, out=str(work / "bench-train"))
    accelerator = make_accelerator(train_cfg)
    train_model, *_ = load_checkpoint(run_dir)
    train_model.train()
    optimizer = make_optimizer(train_cfg, train_model)
    schedule = make_schedule(train_cfg, optimizer)
    train_sc, eval_sc = stream_configs(train_cfg)
    eval_sc = dataclasses.replace(eval_sc, tokenizer=run["tokenizer"])
    readers = open_caches(train_sc)
    stream = batches(train_sc, 0, 0, readers)
    loss_fn = loss_function(train_cfg, train_model)
    for _ in range(3):  # warm-up: workers started, kernels chosen
        train_step(train_cfg, accelerator, train_model, loss_fn, optimizer, schedule, next(stream)[2])

    def train_row():
        torch.set_num_threads(loop_threads)
        samples, t0 = 0, time.perf_counter()
        for _ in range(args.steps):
            batch = next(stream)[2]
            train_step(train_cfg, accelerator, train_model, loss_fn, optimizer, schedule, batch)
            samples += len(batch["id"])
        return samples / (time.perf_counter() - t0), None

    cpu = Accelerator(cpu=True)

    def fuse_eval_before():
        torch.set_num_threads(DEFAULT_THREADS)
        t0 = time.perf_counter()
        loader = eval_loader(dataclasses.replace(eval_sc, batch_size=128), 0, 1)  # fuse-eval's default batch
        summary = evaluate_before(model, loader, tokenizer, modalities, cfg.max_new_tokens, n)
        return summary["count"] / (time.perf_counter() - t0), summary

    def fuse_eval_now():
        t0 = time.perf_counter()
        summary = score(model, run, tokenizer, ScoreConfig(limit=n, progress=False))
        return summary["count"] / (time.perf_counter() - t0), summary

    old_loader = eval_loader(eval_sc, 0, 1, readers)  # the loop built it once, workers per evaluation
    new_loader = eval_loader(eval_sc, 0, 1, readers, limit=n, persistent_workers=True)  # as the loop makes it

    def loop_eval_before():
        torch.set_num_threads(loop_threads)
        t0 = time.perf_counter()
        summary = evaluate_before(model, old_loader, tokenizer, modalities, cfg.max_new_tokens, n)
        return summary["count"] / (time.perf_counter() - t0), summary

    def loop_eval_now():
        torch.set_num_threads(loop_threads)
        t0 = time.perf_counter()
        summary = evaluate(model, new_loader, tokenizer, modalities, cpu, cfg.max_new_tokens, progress=False)
        return summary["count"] / (time.perf_counter() - t0), summary

    rows = {"train step (samples/s)": train_row, "fuse-eval, before (q/s)": fuse_eval_before,
            "fuse-eval, now (q/s)": fuse_eval_now, "eval in training, before (q/s)": loop_eval_before,
            "eval in training, now (q/s)": loop_eval_now}
    rates = {name: [] for name in rows}
    accuracy = {}
    for r in range(args.rounds):
        for name, row in rows.items():
            rate, summary = row()
            rates[name].append(rate)
            if summary is not None:
                accuracy[name] = (summary["accuracy"], summary["count"])
        print(f"round {r + 1}: " + ", ".join(f"{name} {rates[name][-1]:.0f}" for name in rows), flush=True)

    print(f"\ndemo preset, {os.cpu_count()} CPUs, {n} eval questions per row (batch 128), train batch "
          f"{cfg.batch_size}, loop threads {loop_threads}, torch default threads {DEFAULT_THREADS}; "
          f"median of {args.rounds} rounds")
    train_rate = statistics.median(rates["train step (samples/s)"])
    for name in rows:
        med = statistics.median(rates[name])
        ratio = "" if name.startswith("train") else f"   {med / train_rate:.2f}x the train step per sample"
        print(f"  {name:<32} {med:8.0f}  (rounds: {', '.join(f'{x:.0f}' for x in rates[name])}){ratio}")
    print("  eval rows' VQA accuracy (questions scored): "
          + ", ".join(f"{100 * a:.2f}% ({c})" for a, c in accuracy.values()))
    if len({c for _, c in accuracy.values()}) == 1 and len({round(a, 9) for a, _ in accuracy.values()}) > 1:
        print("  WARNING: the eval rows disagree on the same questions")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
