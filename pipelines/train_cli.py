"""``fuse-train``: finetune the fused T5 on VQA from cached embeddings (see :mod:`pipelines.train`)."""

import json
import logging

import click

from fuse import FusionConfigError
from store import StoreError

from .data_cli import parse_caches
from .errors import PipelineError
from .train_config import IMAGE_SOURCES, OPTIMIZERS, PRECISIONS, PRESETS, SCHEDULES, TrainConfig


def format_results(results: dict) -> str:
    lines = []
    for which in ("best", "last"):
        r = results.get(which)
        if r:
            kinds = ", ".join(f"{k} {100 * m['accuracy']:.1f}%" for k, m in r["by_answer_type"].items())
            lines.append(f"{which:>4}: step {r['step']}: VQA accuracy {100 * r['accuracy']:.2f}%, "
                         f"exact match {100 * r['exact_match']:.2f}%  ({kinds})")
    lines.append(f"speed: {results['steps_per_s']:.2f} steps/s, {results['samples_per_s']:.0f} samples/s, "
                 f"stream wait {100 * results['stream_wait_fraction']:.1f}% of the loop")
    lines.append(f"checkpoints: {results['checkpoints']['last']} (last), {results['checkpoints']['best']} (best)")
    lines.append(f"logs: tensorboard --logdir {results['tensorboard']}")
    return "\n".join(lines)


@click.command(context_settings={"show_default": True})
@click.option("--shards", type=click.Path(exists=True, file_okay=False), help="Folder written by `vqa-data shards`.")
@click.option("--cache", "caches", multiple=True, metavar="MODALITY=PATH", help="An embedding cache per vector modality.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory.  [default: runs/train]")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help="Named settings; flags override them.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A YAML or JSON file of settings.")
@click.option("--t5", help="T5: a preset of fuse.PRESETS (random init), a hub name or a local directory.")
@click.option("--tokenizer", help="byt5 (no files) or a Hugging Face tokenizer name or folder.")
@click.option("--fuse", help='Fusion spec: "LAYER:MODALITY[,MODALITY] ...", e.g. "0:question 6:image".')
@click.option("--pool", help='Pooling: "MODALITY:TYPE[:LENGTH] ...", e.g. "image:attention:14".')
@click.option("--positions", metavar="MODALITY[,MODALITY]",
              help='Vector modalities whose tokens get a learned position embedding, e.g. "image" ("": none).')
@click.option("--decoder-layers", type=int, help="Keep the first N decoder blocks.")
@click.option("--steps", type=int, help="Optimizer steps.")
@click.option("--batch-size", type=int, help="Samples per process per micro-batch.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS))
@click.option("--schedule", type=click.Choice(SCHEDULES))
@click.option("--warmup", type=float, help="Warm-up: a fraction of the steps (< 1) or a number of steps.")
@click.option("--clip", type=float, help="Gradient norm clip (0: off).")
@click.option("--eval-every", type=int, help="Evaluate every N steps (and at the end).")
@click.option("--eval-limit", type=int, help="Score at most N eval questions each time (0: all).")
@click.option("--seed", type=int)
@click.option("--mixed-precision", type=click.Choice(PRECISIONS))
@click.option("--num-workers", type=int, help="DataLoader workers of the stream.")
@click.option("--threads", type=int, help="torch CPU threads [default: CPUs per process left after the workers].")
@click.option("--image-source", type=click.Choice(IMAGE_SOURCES),
              help="cache: read the embeddings; online: run the ViT on the images every step.")
@click.option("--allow-missing", is_flag=True, default=None, help="Drop questions whose image the cache lacks.")
@click.option("--resume", is_flag=True, default=None, help="Continue from OUT/checkpoints/last.")
@click.option("--stop-at", type=int, help="Stop after step N with a checkpoint (continue later with --resume).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a finished run in OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of a summary.")
def main(caches, config_file, preset, as_json, **flags):
    """Finetune the fused T5 on VQA, reading image embeddings from the cache.

    Evaluates every --eval-every steps with the official VQA accuracy and keeps the best and the last
    checkpoint; writes OUT/results.json, OUT/config.json and TensorBoard logs in OUT/tb.

    Example:

        fuse-train --preset demo --shards runs/qa --cache image=runs/cache --out runs/demo
        accelerate launch --multi_gpu --num_processes 2 -m pipelines.train_cli --preset demo --shards runs/qa --cache image=runs/cache
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from .train import train

    if caches:
        flags["caches"] = parse_caches(caches)
    try:
        cfg = TrainConfig.resolve(preset or "", config_file, **flags)
        if not cfg.shards:
            raise click.UsageError("--shards is required (a folder written by `vqa-data shards`)")
        results = train(cfg)
    except (PipelineError, StoreError, FusionConfigError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    finally:  # as accelerate's end_training: left to exit with it, a gloo process may abort in teardown
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if results.get("stopped"):
        click.echo(f"stopped at step {results['steps']} (--stop-at); continue with --resume", err=True)
    elif as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        click.echo(format_results(results))


if __name__ == "__main__":
    main()
