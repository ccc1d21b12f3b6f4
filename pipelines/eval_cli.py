"""``fuse-eval``: score a checkpoint on a split, or answer one question about one image."""

import json
import logging
from pathlib import Path

import click

from fuse import FusionConfigError, FusionT5ForConditionalGeneration
from store import StoreError

from .errors import PipelineError
from .train_cli import parse_caches


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run directory (its best checkpoint, else its last)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints" / "best", path / "checkpoints" / "last"):
        if (candidate / "config.json").is_file() and (candidate / "fuse_run.json").is_file():
            return candidate
    raise PipelineError(f"{path}: not a fuse-train checkpoint or run directory (no fuse_run.json)")


def load_checkpoint(path):
    """``(model, run record, tokenizer)`` of a checkpoint written by ``fuse-train``."""
    from .tokens import load_tokenizer

    ckpt = resolve_checkpoint(path)
    run = json.loads((ckpt / "fuse_run.json").read_text())
    if (ckpt / run["tokenizer"]).is_dir():  # a tokenizer folder copied into the checkpoint
        run["tokenizer"] = str(ckpt / run["tokenizer"])
    tokenizer = load_tokenizer(run["tokenizer"])
    model = FusionT5ForConditionalGeneration.from_pretrained(ckpt).eval()
    return model, run, tokenizer, ckpt


def answer_one(model, run, tokenizer, image: str, question: str, max_new_tokens: int = 16) -> str:
    """Run the cache's ViT on ``image`` and the fused T5 on it and ``question``."""
    import torch

    from .online import ImageEmbedder, load_vit
    from .tokens import decode_batch

    modalities = model.config.fusion().modalities()
    inputs = {}
    ids, mask = tokenizer.encode_batch([question], max_length=128)
    inputs[run["text_modality"]] = (ids, mask)
    for name in modalities:
        if name == run["text_modality"]:
            continue
        if name not in run["producers"]:
            raise PipelineError(f"modality {name!r}: the checkpoint does not record how its embeddings were made")
        embedder = ImageEmbedder(load_vit(run["producers"][name]), vqa_dir=".")
        inputs[name] = embedder.embed_paths([image])
    with torch.inference_mode():
        out = model.generate(modalities=inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    return decode_batch(tokenizer, out)[0]


@click.command(context_settings={"show_default": True})
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--shards", type=click.Path(exists=True, file_okay=False), help="Folder written by `vqa-data shards`.")
@click.option("--cache", "caches", multiple=True, metavar="MODALITY=PATH",
              help="Embedding caches (default: the ones the run trained with).")
@click.option("--side", type=click.Choice(["eval", "train"]), default="eval", help="Which side of the shards.")
@click.option("--batch-size", type=int, default=128)
@click.option("--limit", type=click.IntRange(min=0), help="Score at most N questions (0: all).")
@click.option("--allow-missing", is_flag=True,
              help="Drop questions whose id a cache lacks, and count them (on if the run trained so).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Answer one question about this image.")
@click.option("--question", help="The question to answer about --image.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def main(checkpoint, shards, caches, side, batch_size, limit, allow_missing, image, question, as_json):
    """Score a fuse-train checkpoint with the official VQA accuracy, or answer one question.

    CHECKPOINT is a run directory (its best checkpoint is used) or a checkpoint folder.

    Example:

        fuse-eval runs/demo --shards runs/qa
        fuse-eval runs/demo --image shapes/train2014/COCO_train2014_000000000001.jpg --question "What color is the circle?"
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if (image is None) != (question is None):
        raise click.UsageError("--image and --question go together")
    try:
        model, run, tokenizer, ckpt = load_checkpoint(checkpoint)
        if image:
            answer = answer_one(model, run, tokenizer, image, question)
            click.echo(json.dumps({"question": question, "image": image, "answer": answer}) if as_json else answer)
            return
        summary = score(model, run, tokenizer, shards, parse_caches(caches) if caches else None, side,
                        batch_size, limit, allow_missing)
    except (PipelineError, StoreError, FusionConfigError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    summary["checkpoint"] = str(ckpt)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{ckpt}: {summary['count']} questions ({side} side)")
    rows = [("all", summary), *summary["by_answer_type"].items()]
    if summary["by_question_type"]:
        rows += [("", None), ("question type", None), *summary["by_question_type"].items()]
    width = max(12, *(len(kind) + 2 for kind, _ in rows))
    click.echo(f"{'answer type':<{width}}{'count':>8}{'VQA acc':>10}{'exact':>9}")
    for kind, m in rows:
        click.echo(f"{kind:<{width}}{m['count']:>8}{100 * m['accuracy']:>9.2f}%{100 * m['exact_match']:>8.2f}%"
                   if m else kind)


def score(model, run, tokenizer, shards, caches, side, batch_size, limit, allow_missing=False) -> dict:
    from accelerate import Accelerator

    from .shards import shard_paths
    from .stream import StreamConfig, eval_loader
    from .train import evaluate

    cfg = run["config"]
    shards = shards or cfg["shards"]
    sc = StreamConfig(shards=shard_paths(shards, side), caches=caches or cfg["caches"], expect=cfg.get("expect", {}),
                      tokenizer=run["tokenizer"], batch_size=batch_size,
                      num_workers=cfg.get("num_workers", 2), max_answer_len=cfg.get("max_answer_len", 16),
                      allow_missing=allow_missing or cfg.get("allow_missing", False))
    accelerator = Accelerator()
    return evaluate(model, eval_loader(sc, 0, 1), tokenizer, model.config.fusion().modalities(), accelerator,
                    cfg.get("max_new_tokens", 16), limit)


if __name__ == "__main__":
    main()
