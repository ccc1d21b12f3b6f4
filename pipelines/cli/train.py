"""``fuse-train``: finetune the fused T5 on VQA from cached embeddings (see :mod:`pipelines.train.loop`)."""

import json
import logging

import click

from ..data.shards import read_manifest
from ..metrics.vqa import metric_name, score_text
from ..train.config import TrainConfig
from .common import cli_errors, distributed_teardown, parse_caches, setup_logging
from .options import train_options


def _groups_text(metric: str, r: dict) -> str:
    """``yes/no 98.00%, ...`` by answer type, then ``needs: both 91.00%, ...`` for each other group."""
    parts = [", ".join(f"{k} {score_text(metric, m['accuracy'])}" for k, m in r["by_answer_type"].items())]
    parts += [f"{name}: " + ", ".join(f"{k} {score_text(metric, m['accuracy'])}" for k, m in values.items())
              for name, values in r.get("by_group", {}).items()]
    return "; ".join(parts)


def format_results(results: dict) -> str:
    side = results.get("selection_side", "eval")
    metric = results.get("metric", "vqa")
    name = metric_name(metric)
    lines = []
    for which in ("best", "last"):
        r = results.get(which)
        if r:
            kinds = _groups_text(metric, r)
            lines.append(f"{which:>4}: step {r['step']}: {name} {score_text(metric, r['accuracy'])}, "
                         f"exact match {100 * r['exact_match']:.2f}%  ({kinds})"
                         + (f" on the {side} side" if side != "eval" else ""))
    final = results.get("eval")
    if final:
        kinds = _groups_text(metric, final)
        lines.append(f"eval: the best checkpoint (step {final['step']}) on all {final['count']} eval examples: "
                     f"{name} {score_text(metric, final['accuracy'])}, exact match {100 * final['exact_match']:.2f}%  "
                     f"({kinds})")
    if results.get("steps_per_s") is not None:
        lines.append(f"speed: {results['steps_per_s']:.2f} steps/s, {results['samples_per_s']:.0f} samples/s, "
                     f"stream wait {100 * results['stream_wait_fraction']:.1f}% of the loop")
    lines.append(f"checkpoints: {results['checkpoints']['last']} (last), {results['checkpoints']['best']} (best)")
    lines.append(f"logs: tensorboard --logdir {results['tensorboard']}")
    return "\n".join(lines)


@click.command(context_settings={"show_default": True})
@train_options()
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of a summary.")
def main(caches, config_file, preset, as_json, **flags):
    """Finetune the fused T5 on the shards' examples, reading each vector field from its cache.

    --fuse names where each field joins the encoder: text fields of the data (the question, a
    title, ...) and vector fields with a --cache (image, audio, ...), each looked up by its own id; a
    field the data lacks is refused before any step. Evaluates every --eval-every steps with the
    data's metric (the official VQA accuracy for VQA; exact match for labels; CIDEr-D and BLEU-4 for
    captions) and keeps the best and the last checkpoint; writes OUT/results.json, OUT/config.json
    and TensorBoard logs in OUT/tb. Shards with a select side (vqa-data shards --select-fraction)
    pick the best checkpoint there and score the eval side once with it at the end. --fuse 0:question without --cache trains on the question alone.

    Example:

    \b
        fuse-train --preset demo --shards runs/qa --cache image=runs/cache --out runs/demo
        fuse-train --preset demo --shards runs/qa --fuse 0:question --lr 2e-3 --out runs/question-only
        accelerate launch --multi_gpu --num_processes 2 -m pipelines.cli.train --preset demo --shards runs/qa --cache image=runs/cache
    """
    setup_logging(logging.INFO)
    from ..train.loop import train

    if caches:
        flags["caches"] = parse_caches(caches)
    with cli_errors():
        cfg = TrainConfig.resolve(preset or "", config_file, **flags)
    if not cfg.shards:
        raise click.UsageError("--shards is required (a folder written by `vqa-data shards`)")
    with cli_errors():  # a field the data lacks: before anything is made
        cfg.check_fields(read_manifest(cfg.shards)["fields"], f"the shards in {cfg.shards}")
    with cli_errors(), distributed_teardown():
        results = train(cfg)
    from ..data.stream import rank_info

    if rank_info()[0] != 0:
        return  # the main process reports, once for all processes and nodes
    if results.get("stopped"):
        click.echo(f"stopped at step {results['steps']} (--stop-at); continue with --resume", err=True)
    elif as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        click.echo(format_results(results))


if __name__ == "__main__":
    main()
