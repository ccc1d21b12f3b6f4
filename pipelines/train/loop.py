"""Stage 2 training: the fused T5 finetuned on VQA from the cached embeddings (``fuse-train``).

:func:`train` takes a :class:`~pipelines.train.config.TrainConfig` and returns the results it also
writes to ``OUT/results.json``. Devices, processes and mixed precision come from accelerate
(``accelerate launch -m pipelines.cli.train ...`` or the ``fuse-train`` script). The run directory
holds::

    OUT/config.json            the resolved config (what the run did, flags and file merged)
    OUT/results.json           best and last VQA accuracy (by answer type), steps/s, samples/s; the
                               best checkpoint's score on the eval side; "stopped" if --stop-at ended it
    OUT/tb/                    TensorBoard: loss, lr, accuracy, steps/s, samples/s, stream wait
    OUT/checkpoints/last/      model (safetensors + config.json), optimizer, schedule, RNG, step
    OUT/checkpoints/best/      the model of the best eval so far

The best checkpoint is picked on the shards' select side where they have one (VQA v2's protocol:
a held-out slice of train2014), and the eval side (all of val2014) is then scored once with it;
without a select side it is picked on the eval side (the thesis' 80/20 split).

Checkpoints are written to a temporary folder and renamed into place, so a killed run always has a
whole one; ``--resume`` continues from ``last`` with the same data order (the stream's epoch and
position are saved) and the same random state, given the run's own settings (:func:`check_resume`
refuses others before anything in the run folder changes). A run is finished when its
``results.json`` is whole and not marked ``stopped``: a run ended by ``--stop-at`` writes one so
marked, and the ``--resume`` that finishes it replaces it.
"""

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fuse import FusionT5ForConditionalGeneration, train_step_flops

from ..data.shards import read_manifest, selection_side
from ..data.stream import check_stream, eval_loader, open_caches
from ..data.tokens import load_tokenizer
from ..errors import PipelineError, ResumeError, TrainingDiverged
from ..files import existing_dir, write_atomic
from ..metrics.vqa import metric_name, score_text
from .checkpoint import (
    RUN_FILE,
    TRAINER_STATE,
    checkpoint_dirs,
    has_checkpoint,
    load_train_state,
    read_checkpoint_json,
    save_checkpoint,
)
from .config import RESUME_MAY_CHANGE, TrainConfig
from .evaluate import evaluate
from .model import build_model, make_optimizer, make_schedule, model_inputs
from .streams import batches, stream_configs

RESULTS = "results.json"

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """What a run reads: the train stream, the selection side's and (if another) the eval side's
    batches, the caches (opened once) and the tokenizer."""

    train_sc: object
    readers: dict
    evals: object  # the selection side's batches (every --eval-every steps)
    final: object  # the eval side's batches, scored once with the best checkpoint; None: evals is it
    selection: str  # the side the best checkpoint is picked on: "select" or "eval"
    tokenizer: object
    shapes: dict  # modality -> value shape of its cache
    run: dict  # the record saved in every checkpoint (fuse_run.json)
    metric: str = "vqa"  # the data's metric (pipelines.data.example.METRICS)
    labels: list | None = None  # a closed label set's labels (the manifest's), ranked by likelihood


@dataclass
class Meter:
    """Time spent waiting for data and computing, samples seen, and the loss since the last log line."""

    wait: float = 0.0
    compute: float = 0.0
    samples: int = 0
    steps: int = 0
    window: list = field(default_factory=list)  # [(step, loss on the device)] since the last log line

    @property
    def elapsed(self) -> float:
        return self.wait + self.compute


# ---- named steps --------------------------------------------------------------------------------

def make_accelerator(cfg: TrainConfig):
    """accelerate's Accelerator for the run, and torch's CPU threads (one per core left to this
    process after the stream's workers: on a small CPU, threads sharing a core with a worker thrash)."""
    from accelerate import Accelerator

    # accelerate joins CPU processes (gloo) only when told it runs on the CPU
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads(accelerator.num_processes))
    return accelerator


def finished_results(out) -> dict | None:
    """The ``results.json`` of a finished run in ``out``; ``None`` if there is none, or it is unreadable
    or marked ``stopped`` (``--stop-at``: the run goes on with ``--resume``)."""
    try:
        results = json.loads((Path(out) / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and not results.get("stopped") else None


def check_out_dir(cfg: TrainConfig) -> None:
    """Refuse to overwrite a finished or unfinished run unless asked, and to resume from nothing
    (or from another run's settings: :func:`check_resume`)."""
    out = Path(cfg.out)
    last, _ = checkpoint_dirs(out)
    if cfg.resume and not has_checkpoint(last):
        raise PipelineError(f"--resume: {last} holds no checkpoint to resume from")
    if cfg.resume:
        check_resume(cfg, last)
    if not cfg.resume and finished_results(out) is not None and not cfg.overwrite:
        raise PipelineError(f"{out} already holds a finished run: pass --resume, --overwrite or another --out")
    if not cfg.resume and existing_dir(last).exists() and not cfg.overwrite:
        raise PipelineError(f"{out} holds the checkpoint of an unfinished run ({last}): pass --resume to "
                            "continue it, --overwrite to start again, or another --out")


def check_resume(cfg: TrainConfig, last: Path) -> None:
    """A ``--resume`` continues the checkpoint's own run: with its settings (all but
    :data:`~pipelines.train.config.RESUME_MAY_CHANGE`) and not finished (short of its last step, or at
    it without a final ``results.json``: killed while scoring, it then only scores and writes it).
    Checked before anything is written, so a refused resume leaves the run folder as it was.

    Raises:
        ResumeError: settings that differ from the checkpoint's (exit 2), naming their flags.
        PipelineError: the run is finished, or the checkpoint's records are unreadable.
    """
    saved = read_checkpoint_json(last, RUN_FILE).get("config")
    if not isinstance(saved, dict):
        raise PipelineError(f"{existing_dir(last) / RUN_FILE}: no 'config' of the run")
    diff = cfg.differences(saved, ignore=RESUME_MAY_CHANGE)
    if diff:
        detail = "; ".join(f"{cfg.flag(k)}: {have!r} there, {want!r} now" for k, have, want in diff[:4])
        more = f"; and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise ResumeError(f"--resume: the checkpoint {existing_dir(last)} was trained with other settings "
                          f"({detail}{more}): resume with its own settings, or start a new run (--overwrite "
                          "or another --out)")
    step = read_checkpoint_json(last, TRAINER_STATE).get("step")
    if isinstance(step, int) and step >= cfg.steps and finished_results(cfg.out) is not None:
        raise PipelineError(f"--resume: {existing_dir(last)} is at step {step} of {cfg.steps}: the run is "
                            "finished, there is nothing to continue")


def open_data(cfg: TrainConfig, accelerator, train_checked: bool = False) -> RunData:
    """Open the caches once and check every side against them before any compute.

    Args:
        train_checked: the caller (a sweep) has run the train side's pre-flight check already.
    """
    manifest = read_manifest(cfg.shards)
    cfg.check_fields(manifest["fields"], f"the shards in {cfg.shards}")  # a field the data lacks: before any step
    selection = selection_side(cfg.shards)
    rank, world = accelerator.process_index, accelerator.num_processes
    train_sc, select_sc = stream_configs(cfg, world, eval_side=selection)
    readers = open_caches(train_sc)  # every side uses the same caches and expectations
    if not train_checked:
        check_stream(train_sc, readers)  # every id present: fails (or counts, --allow-missing) now
    # read every --eval-every steps: its workers stay (starting them cost 1-2 s per evaluation on a 2-core CPU)
    evals = eval_loader(select_sc, rank, world, readers, limit=cfg.eval_limit, persistent_workers=True)
    final = None
    if selection != "eval":  # its ids are checked now, not after the training
        _, eval_sc = stream_configs(cfg, world, eval_side="eval")
        final = eval_loader(eval_sc, rank, world, readers)
    shapes = {name: tuple(reader.meta.shape) for name, reader in readers.items()}
    run = {"config": cfg.to_dict(), "producers": {name: r.meta.producer for name, r in readers.items()},
           "tokenizer": train_sc.tokenizer, "text_fields": cfg.text_lens(), "metric": manifest["metric"]}
    return RunData(train_sc, readers, evals, final, selection, load_tokenizer(train_sc.tokenizer), shapes, run,
                   manifest["metric"], manifest.get("labels"))


def init_model(cfg: TrainConfig, data: RunData, last: Path):
    """``(model, optimizer, schedule, trainer state)``: new, or restored from ``last`` (``--resume``)."""
    if cfg.resume:
        model = FusionT5ForConditionalGeneration.from_pretrained(existing_dir(last))
    else:
        dims = {name: shape[-1] for name, shape in data.shapes.items()}
        lengths = {name: shape[0] for name, shape in data.shapes.items()}
        model = build_model(cfg, dims, lengths, data.tokenizer.vocab_size)
    optimizer = make_optimizer(cfg, model)
    schedule = make_schedule(cfg, optimizer)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "history": []}
    if cfg.resume:
        state = load_train_state(last, optimizer, schedule)
        log.info("resuming %s at step %d", cfg.out, state["step"])
    return model, optimizer, schedule, state


def make_online_embedder(cfg: TrainConfig, producers: dict, device):
    """``--image-source online``: the cache's own ViT, rebuilt from its metadata, over the image files."""
    from ..data.online import ImageEmbedder, load_vit

    manifest = read_manifest(cfg.shards)
    if manifest["layout"] != "vqa-v2":
        raise ValueError(f"--image-source online: reads the images of a VQA v2 folder; the shards in {cfg.shards} "
                         f"were made from the {manifest['layout']} layout: train from the cache")
    images = manifest.get("images_root") or manifest["source"]  # --images-root, else the VQA folder
    return ImageEmbedder(load_vit(producers["image"], device), images, manifest.get("splits", ["train"]),
                         threads=max(1, cfg.num_workers))


def step_flops(cfg: TrainConfig, model, batch: dict, shapes: dict) -> float:
    """FLOPs of one optimizer step at this batch's padded lengths."""
    fused = cfg.fused_modalities()
    lens = {**{k: ids.shape[1] for k, (ids, _) in batch["tokens"].items()}, **{k: s[0] for k, s in shapes.items() if k in fused}}
    return train_step_flops(model.config, cfg.batch_size * cfg.grad_accum, lens, batch["labels"].shape[1]).train_step


def loss_function(cfg: TrainConfig, model):
    """``(modalities, labels) -> loss`` of the training step: the model's forward, compiled with
    ``--compile`` (one graph per padded shape, no graph breaks in the fused encoder: see
    ``bench/train_bench.py --explain``). Evaluation calls the model itself, uncompiled."""
    def loss_fn(modalities, labels):
        return model(modalities=modalities, labels=labels).loss

    if not cfg.compile:
        return loss_fn
    import torch._dynamo

    # a shape per (text bucket, answer bucket) pair: up to 128/8 x 16/8 with the default limits
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(loss_fn, dynamic=False)


def train_step(cfg, accelerator, model, loss_fn, optimizer, schedule, batch: dict) -> torch.Tensor:
    """One micro-batch forward and backward, and the optimizer step when accumulation is complete.

    Returns:
        The micro-batch's loss, on the device: it is read back (and checked) only when logged
        (:func:`read_losses`), so the step never waits for the device.
    """
    with accelerator.accumulate(model):
        loss = loss_fn(model_inputs(batch, cfg.fused_modalities(), accelerator.device),
                       batch["labels"].to(accelerator.device, non_blocking=True))
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def read_losses(window: list, last: Path) -> list:
    """The losses of ``window`` (``[(step, loss on the device)]``) as floats: one read-back.

    Raises:
        TrainingDiverged: a loss is NaN or infinite (naming the first step that had one).
    """
    if not window:
        return []
    values = torch.stack([loss for _, loss in window]).float().tolist()
    for (step, _), value in zip(window, values):
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"the loss became {value} at step {step}: stopping. The last good checkpoint "
                f"is {last if has_checkpoint(last) else '(none yet)'}; try a lower --lr or --clip")
    return values


def log_step(writer, bar, schedule, meter: Meter, losses: list, step: int) -> None:
    """Loss (mean since the last line), learning rate and speed to TensorBoard and the progress bar."""
    loss = sum(losses) / len(losses)
    writer.add_scalar("train/loss", loss, step)
    writer.add_scalar("train/lr", schedule.get_last_lr()[0], step)
    writer.add_scalar("speed/steps_per_s", meter.steps / meter.elapsed, step)
    writer.add_scalar("speed/samples_per_s", meter.samples / meter.elapsed, step)
    writer.add_scalar("speed/stream_wait_fraction", meter.wait / meter.elapsed, step)
    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)


def eval_kw(cfg, accelerator, desc: str) -> dict:
    """The keywords of :func:`evaluate` in a run: a progress bar where the training has one and stderr
    is a terminal (a bar under a bar moves the cursor: garbage in a log); torch's threads stay the
    training step's."""
    return dict(progress=None if accelerator.is_main_process and cfg.progress else False, desc=desc)


def _scored(metrics: dict) -> str:
    return (f"{metric_name(metrics['metric'])} {score_text(metrics['metric'], metrics['accuracy'])} "
            f"(exact match {100 * metrics['exact_match']:.2f}%")


def eval_and_checkpoint(cfg, accelerator, model, optimizer, schedule, data: RunData, state: dict, writer, bar) -> None:
    """Score the selection side; keep the best checkpoint and write the last one (main process)."""
    step = state["step"]
    metrics = evaluate(model, data.evals, data.tokenizer, cfg.fused_modalities(), accelerator,
                       cfg.max_new_tokens, metric=data.metric, labels=data.labels, **eval_kw(cfg, accelerator, f"eval ({data.selection} side)"))
    entry = {"step": step, **metrics}
    state["history"].append(entry)
    improved = state["best"] is None or metrics["accuracy"] > state["best"]["accuracy"]
    if improved:
        state["best"] = entry
    if accelerator.is_main_process:
        writer.add_scalar("eval/accuracy", metrics["accuracy"], step)
        writer.add_scalar("eval/exact_match", metrics["exact_match"], step)
        for kind, m in metrics["by_answer_type"].items():
            writer.add_scalar(f"eval/accuracy_{kind}", m["accuracy"], step)
        for group, values in metrics.get("by_group", {}).items():  # e.g. eval/needs/both
            for value, m in values.items():
                writer.add_scalar(f"eval/{group}/{value}", m["accuracy"], step)
        side = "" if data.selection == "eval" else f" on the {data.selection} side"
        bar.write(f"step {step}: {_scored(metrics)}){side}", file=sys.stderr)  # stdout: --json
        last, best = checkpoint_dirs(cfg.out)
        unwrapped = accelerator.unwrap_model(model)
        if improved:
            save_checkpoint(best, unwrapped, state={"step": step, "metrics": metrics}, run=data.run)
        save_checkpoint(last, unwrapped, optimizer, schedule, state, run=data.run)
    accelerator.wait_for_everyone()


def score_best(cfg, accelerator, model, data: RunData, state: dict, writer, bar) -> dict:
    """Score the eval side once with the best checkpoint (picked on the select side), whole."""
    _, best = checkpoint_dirs(cfg.out)
    accelerator.wait_for_everyone()  # the main process wrote it
    if state["best"]["step"] != state["step"]:  # the model in memory is the last one
        weights = FusionT5ForConditionalGeneration.from_pretrained(existing_dir(best)).state_dict()
        accelerator.unwrap_model(model).load_state_dict(weights)
    metrics = evaluate(model, data.final, data.tokenizer, cfg.fused_modalities(), accelerator, cfg.max_new_tokens,
                       metric=data.metric, labels=data.labels,
                       **eval_kw(cfg, accelerator, "eval (eval side, best checkpoint)"))
    entry = {"step": state["best"]["step"], "side": "eval", "checkpoint": str(best), **metrics}
    if accelerator.is_main_process:
        writer.add_scalar("final/eval_accuracy", metrics["accuracy"], entry["step"])
        bar.write(f"best checkpoint (step {entry['step']}) on the eval side: {_scored(metrics)}, "
                  f"{metrics['count']} examples)", file=sys.stderr)
    return entry


def results_of(cfg, accelerator, model, state: dict, meter: Meter, flops, data: RunData, final=None) -> dict:
    """The ``results.json`` of a run (finished, or stopped by ``--stop-at``: then marked ``stopped``)."""
    elapsed = meter.elapsed
    last, best = checkpoint_dirs(cfg.out)
    return {
        "stopped": state["step"] < cfg.steps,
        "best": state["best"], "last": state["history"][-1] if state["history"] else None,
        "metric": data.metric, "selection_side": data.selection, "eval": final,
        "steps_per_s": meter.steps / elapsed if elapsed else None,
        "samples_per_s": meter.samples / elapsed if elapsed else None,
        "stream_wait_fraction": meter.wait / elapsed if elapsed else None,
        "step_time_s": meter.compute / meter.steps if meter.steps else None,
        "steps": state["step"], "params": sum(p.numel() for p in model.parameters()), "flops_per_step": flops,
        "device": str(accelerator.device), "num_processes": accelerator.num_processes,
        "checkpoints": {"last": str(last), "best": str(best)}, "tensorboard": str(Path(cfg.out) / "tb"),
        "config": cfg.to_dict(), "history": state["history"],
    }


# ---- the loop -------------------------------------------------------------------------------------

def train(cfg: TrainConfig, *, train_checked: bool = False) -> dict:
    """Train, evaluate every ``eval_every`` steps and at the end; returns the results dict.

    Args:
        cfg: the run.
        train_checked: the train side's pre-flight check has been run by the caller (a sweep runs
            it once for all its runs).

    Raises:
        TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
        PipelineError, store.StoreError, fuse.FusionConfigError: bad data, cache or configuration.
    """
    from accelerate.utils import set_seed
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bars, once per checkpoint
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    check_out_dir(cfg)
    set_seed(cfg.seed)
    out = Path(cfg.out)
    last, _ = checkpoint_dirs(out)
    if main and not cfg.resume:  # --overwrite: the folder's results.json is always its current run's
        (out / RESULTS).unlink(missing_ok=True)
    data = open_data(cfg, accelerator, train_checked)
    model, optimizer, schedule, state = init_model(cfg, data, last)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    loss_fn = loss_function(cfg, model)
    online = None
    if cfg.image_source == "online" and "image" in cfg.fused_modalities():
        online = make_online_embedder(cfg, data.run["producers"], accelerator.device)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        writer = SummaryWriter(out / "tb")
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not main or not cfg.progress, unit="step",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    stream = batches(data.train_sc, state["epoch"], state["batch_in_epoch"], data.readers)
    meter, flops = Meter(), None
    model.train()
    while state["step"] < cfg.steps:
        t0 = time.perf_counter()
        epoch, index, batch = next(stream)
        t1 = time.perf_counter()
        if online is not None:  # the ViT on the pixels, instead of the cache's values: part of the step
            batch["vectors"]["image"] = online(batch["ids"]["image"])
        if flops is None:  # counted on the first batch, from its padded lengths
            flops = step_flops(cfg, accelerator.unwrap_model(model), batch, data.shapes)
        meter.window.append((state["step"] + 1, train_step(cfg, accelerator, model, loss_fn, optimizer, schedule, batch)))
        meter.wait += t1 - t0
        meter.compute += time.perf_counter() - t1
        meter.samples += len(batch["id"]) * accelerator.num_processes
        state["epoch"], state["batch_in_epoch"] = epoch, index + 1
        if not accelerator.sync_gradients:
            continue
        state["step"] += 1
        meter.steps += 1
        bar.update(1)
        step = state["step"]
        log_now = step % cfg.log_every == 0 or step == cfg.steps
        eval_now = step % cfg.eval_every == 0 or step == cfg.steps
        stop_now = bool(cfg.stop_at) and cfg.stop_at <= step < cfg.steps
        if log_now or eval_now or stop_now:  # the losses' one read-back: checked before any checkpoint
            losses = read_losses(meter.window, last)
            if main and log_now:
                log_step(writer, bar, schedule, meter, losses, step)
            if log_now:
                meter.window.clear()
        if eval_now:
            eval_and_checkpoint(cfg, accelerator, model, optimizer, schedule, data, state, writer, bar)
        if stop_now:
            if main:
                save_checkpoint(last, accelerator.unwrap_model(model), optimizer, schedule, state, run=data.run)
            accelerator.wait_for_everyone()
            log.info("stopped at step %d (--stop-at); continue with --resume", step)
            break
    final = None
    if state["step"] >= cfg.steps and data.final is not None:
        final = score_best(cfg, accelerator, model, data, state, writer, bar)
    bar.close()
    if main:
        writer.close()
    results = results_of(cfg, accelerator, model, state, meter, flops, data, final)
    if main:  # stopped (--stop-at): marked so, and replaced by the --resume that finishes the run
        write_atomic(out / RESULTS, json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return results
