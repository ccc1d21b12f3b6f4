"""Stage 2 training: the fused T5 finetuned on VQA from the cached embeddings (``fuse-train``).

One function, :func:`train`, takes a :class:`~pipelines.train_config.TrainConfig` and returns the
results it also writes to ``OUT/results.json``. Devices, processes and mixed precision come from
accelerate (``accelerate launch -m pipelines.train_cli ...`` or the ``fuse-train`` script). The run
directory holds::

    OUT/config.json            the resolved config (what the run did, flags and file merged)
    OUT/results.json           best and last VQA accuracy (by answer type), steps/s, samples/s
    OUT/tb/                    TensorBoard: loss, lr, accuracy, steps/s, samples/s, stream wait
    OUT/checkpoints/last/      model (safetensors + config.json), optimizer, schedule, RNG, step
    OUT/checkpoints/best/      the model of the best eval so far

Checkpoints are written to a temporary folder and renamed into place, so a killed run always has a
whole one; ``--resume`` continues from ``last`` with the same data order (the stream's epoch and
position are saved) and the same random state.
"""

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from fuse import FusionT5Config, FusionT5ForConditionalGeneration, PRESETS, train_step_flops

from .errors import PipelineError
from .metric import VQAScore
from .stream import StreamConfig, check_stream, eval_loader, open_caches, train_loader
from .shards import shard_paths
from .tokens import decode_batch, load_tokenizer
from .train_config import TEXT, TrainConfig

log = logging.getLogger(__name__)
RUN_FILE = "fuse_run.json"
RUN_TOKENIZER = "tokenizer"


class TrainingDiverged(PipelineError):
    """The loss stopped being finite."""


# ---- model ----------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, dims: dict, lengths: dict, vocab_size: int) -> FusionT5ForConditionalGeneration:
    """The fused T5 of ``cfg``: a preset architecture with random weights sized to the tokenizer's
    vocabulary, or a pretrained T5."""
    fusion = dict(fusion_spec=cfg.fuse, pool=cfg.pool or None, text_modalities=[TEXT],
                  modality_dims={k: v for k, v in dims.items() if k in cfg.fused_modalities()},
                  modality_lengths={k: v for k, v in lengths.items() if k in cfg.fused_modalities()},
                  modality_positions=cfg.position_modalities())
    if cfg.t5 in PRESETS:
        overrides = {} if cfg.decoder_layers is None else {"num_decoder_layers": cfg.decoder_layers}
        config = FusionT5Config.from_name(cfg.t5, dropout_rate=cfg.dropout, vocab_size=vocab_size, **fusion,
                                          **overrides)
        return FusionT5ForConditionalGeneration(config)
    return FusionT5ForConditionalGeneration.from_t5(cfg.t5, decoder_layers=cfg.decoder_layers,
                                                    config_overrides={"dropout_rate": cfg.dropout}, **fusion)


def model_inputs(batch: dict, modalities, device) -> dict:
    """The ``modalities`` argument of the fused T5 from a stream batch (only the fused ones)."""
    out = {}
    for name in modalities:
        if name == TEXT:
            out[name] = (batch["input_ids"].to(device, non_blocking=True),
                         batch["attention_mask"].to(device, non_blocking=True))
        else:
            out[name] = batch["vectors"][name].to(device, non_blocking=True).float()
    return out


# ---- optimisation ---------------------------------------------------------------------------------

def make_optimizer(cfg: TrainConfig, model):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name or "embedding" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def make_schedule(cfg: TrainConfig, optimizer):
    from transformers import get_scheduler

    return get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps(),
                         num_training_steps=cfg.steps)


# ---- checkpoints ----------------------------------------------------------------------------------

def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(path: Path, model, optimizer=None, schedule=None, state=None, run=None) -> None:
    """Model as safetensors (``save_pretrained``); optimizer and schedule as tensors and plain
    numbers (``torch.save``, read back with ``weights_only=True``); step and stream position as JSON;
    ``run`` (config, cache producers, tokenizer) as ``fuse_run.json`` with a copy of a tokenizer
    folder, so that a checkpoint alone answers questions (``fuse-eval``)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if run is not None:
        run = dict(run)
        if Path(run["tokenizer"]).is_dir():
            shutil.copytree(run["tokenizer"], tmp / RUN_TOKENIZER)
            run["tokenizer"] = RUN_TOKENIZER
        (tmp / RUN_FILE).write_text(json.dumps(run, indent=2))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "train_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state or {}, indent=2))
    _replace_dir(tmp, path)


def load_train_state(path: Path, optimizer, schedule) -> dict:
    blob = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    schedule.load_state_dict(blob["schedule"])
    torch.set_rng_state(blob["torch_rng"])
    return json.loads((path / "trainer_state.json").read_text())


# ---- evaluation -----------------------------------------------------------------------------------

@torch.inference_mode()
def evaluate(model, loader, tokenizer, modalities, accelerator, max_new_tokens: int, limit=None) -> dict:
    """VQA accuracy and exact match (overall and by answer type) over this rank's share, summed
    over ranks."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    score = VQAScore()
    for batch in loader:
        with accelerator.autocast():
            ids = unwrapped.generate(modalities=model_inputs(batch, modalities, accelerator.device),
                                     max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        score.add_batch(decode_batch(tokenizer, ids), batch["answers"], batch["answer_type"], batch["question_type"])
        if limit and len(score) >= limit:
            break
    unwrapped.train(was_training)
    if accelerator.num_processes > 1:
        total = VQAScore()
        for state in accelerator.gather_for_metrics([score.state()], use_gather_object=True):
            total.merge(state)
        score = total
    return score.summary()


def make_online_embedder(cfg: TrainConfig, producers: dict, device):
    """``--image-source online``: the cache's own ViT, rebuilt from its metadata, over the image files."""
    from .online import ImageEmbedder, load_vit
    from .shards import read_manifest

    manifest = read_manifest(cfg.shards)
    return ImageEmbedder(load_vit(producers["image"], device), manifest["source"], manifest.get("splits", ["train"]),
                         threads=max(1, cfg.num_workers))


# ---- the loop -------------------------------------------------------------------------------------

def stream_configs(cfg: TrainConfig, num_processes: int):
    common = dict(caches=cfg.caches, expect=cfg.expect, tokenizer=cfg.tokenizer_path(), num_workers=cfg.num_workers,
                  seed=cfg.seed, allow_missing=cfg.allow_missing, max_answer_len=cfg.max_answer_len)
    train_sc = StreamConfig(shards=shard_paths(cfg.shards, "train"), batch_size=cfg.batch_size,
                            shuffle_buffer=cfg.shuffle_buffer, resample=num_processes > 1, **common)
    eval_sc = StreamConfig(shards=shard_paths(cfg.shards, "eval"), batch_size=cfg.eval_batch_size, **common)
    return train_sc, eval_sc


def batches(sc: StreamConfig, epoch: int, skip: int):
    """Endless training batches as ``(epoch, index in epoch, batch)``; starts at (epoch, skip)."""
    while True:
        for i, batch in enumerate(train_loader(sc, epoch)):
            if i >= skip:
                yield epoch, i, batch
        epoch, skip = epoch + 1, 0


def train(cfg: TrainConfig) -> dict:
    """Train, evaluate every ``eval_every`` steps and at the end; returns the results dict.

    Raises:
        TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
        PipelineError, store.StoreError, fuse.FusionConfigError: bad data, cache or configuration.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bars, once per checkpoint

    # accelerate joins CPU processes (gloo) only when told it runs on the CPU
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    main = accelerator.is_main_process
    if accelerator.device.type == "cpu":
        per_process = max(1, (os.cpu_count() or 1) // accelerator.num_processes - cfg.num_workers)
        torch.set_num_threads(cfg.threads or per_process)
    out = Path(cfg.out)
    ckpt_last, ckpt_best = out / "checkpoints" / "last", out / "checkpoints" / "best"
    if cfg.resume and not (ckpt_last / "trainer_state.json").is_file():
        raise PipelineError(f"--resume: {ckpt_last} holds no checkpoint to resume from")
    if not cfg.resume and (out / "results.json").exists() and not cfg.overwrite:
        raise PipelineError(f"{out} already holds a finished run: pass --resume, --overwrite or another --out")
    if not cfg.resume and ckpt_last.exists() and not cfg.overwrite:
        raise PipelineError(f"{out} holds the checkpoint of an unfinished run ({ckpt_last}): pass --resume to "
                            "continue it, --overwrite to start again, or another --out")
    set_seed(cfg.seed)

    train_sc, eval_sc = stream_configs(cfg, accelerator.num_processes)
    check_stream(train_sc)  # caches match their expectations, every id is present: before any compute
    evals = eval_loader(eval_sc, accelerator.process_index, accelerator.num_processes)  # checks the eval side too
    readers = open_caches(train_sc)
    shapes = {name: reader.meta.shape for name, reader in readers.items()}
    producers = {name: reader.meta.producer for name, reader in readers.items()}
    run = {"config": cfg.to_dict(), "producers": producers, "tokenizer": train_sc.tokenizer,
           "text_modality": TEXT}
    dims = {name: shape[-1] for name, shape in shapes.items()}
    lengths = {name: shape[0] for name, shape in shapes.items()}
    tokenizer = load_tokenizer(train_sc.tokenizer)
    if cfg.resume:
        model = FusionT5ForConditionalGeneration.from_pretrained(ckpt_last)
    else:
        model = build_model(cfg, dims, lengths, tokenizer.vocab_size)
    modalities = cfg.fused_modalities()
    optimizer = make_optimizer(cfg, model)
    schedule = make_schedule(cfg, optimizer)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "history": []}
    if cfg.resume:
        state = load_train_state(ckpt_last, optimizer, schedule)
        log.info("resuming %s at step %d", out, state["step"])
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    online = None
    if cfg.image_source == "online" and "image" in modalities:
        online = make_online_embedder(cfg, producers, accelerator.device)
    n_params = sum(p.numel() for p in model.parameters())
    flops = None  # counted on the first batch, from its padded lengths

    writer = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out / "tb")
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not main or not cfg.progress, unit="step",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    stream = batches(train_sc, state["epoch"], state["batch_in_epoch"])
    t_train = t_wait = 0.0
    samples = 0
    steps_done = 0
    model.train()
    window_loss, window_n = 0.0, 0
    while state["step"] < cfg.steps:
        t0 = time.perf_counter()
        epoch, index, batch = next(stream)
        t1 = time.perf_counter()
        if online is not None:  # the ViT on the pixels, instead of the cache's values: part of the step
            batch["vectors"]["image"] = online(batch["image_id"])
        if flops is None:
            lens = {TEXT: batch["input_ids"].shape[1], **{k: v for k, v in lengths.items() if k in modalities}}
            flops = train_step_flops(accelerator.unwrap_model(model).config, cfg.batch_size * cfg.grad_accum,
                                     lens, batch["labels"].shape[1]).train_step
        with accelerator.accumulate(model):
            loss = model(modalities=model_inputs(batch, modalities, accelerator.device),
                         labels=batch["labels"].to(accelerator.device)).loss
            loss_value = loss.item()  # the step's one read-back from the device
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"the loss became {loss_value} at step {state['step'] + 1}: stopping. The last good checkpoint "
                    f"is {ckpt_last if ckpt_last.exists() else '(none yet)'}; try a lower --lr or --clip")
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        t_wait += t1 - t0
        t_train += t2 - t1
        samples += len(batch["answers"]) * accelerator.num_processes
        window_loss += loss_value
        window_n += 1
        state["epoch"], state["batch_in_epoch"] = epoch, index + 1
        if not accelerator.sync_gradients:
            continue
        state["step"] += 1
        steps_done += 1
        bar.update(1)
        step = state["step"]
        if main and (step % cfg.log_every == 0 or step == cfg.steps):
            elapsed = t_train + t_wait
            writer.add_scalar("train/loss", window_loss / window_n, step)
            writer.add_scalar("train/lr", schedule.get_last_lr()[0], step)
            writer.add_scalar("speed/steps_per_s", steps_done / elapsed, step)
            writer.add_scalar("speed/samples_per_s", samples / elapsed, step)
            writer.add_scalar("speed/stream_wait_fraction", t_wait / elapsed, step)
            bar.set_postfix(loss=f"{window_loss / window_n:.3f}", refresh=False)
            window_loss, window_n = 0.0, 0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics = evaluate(model, evals, tokenizer, modalities, accelerator, cfg.max_new_tokens, cfg.eval_limit)
            entry = {"step": step, **metrics}
            state["history"].append(entry)
            improved = state["best"] is None or metrics["accuracy"] > state["best"]["accuracy"]
            if improved:
                state["best"] = entry
            if main:
                writer.add_scalar("eval/accuracy", metrics["accuracy"], step)
                writer.add_scalar("eval/exact_match", metrics["exact_match"], step)
                for kind, m in metrics["by_answer_type"].items():
                    writer.add_scalar(f"eval/accuracy_{kind}", m["accuracy"], step)
                bar.write(f"step {step}: VQA accuracy {100 * metrics['accuracy']:.2f}% "
                          f"(exact match {100 * metrics['exact_match']:.2f}%)", file=sys.stderr)  # stdout: --json
                unwrapped = accelerator.unwrap_model(model)
                if improved:
                    save_checkpoint(ckpt_best, unwrapped, state={"step": step, "metrics": metrics}, run=run)
                save_checkpoint(ckpt_last, unwrapped, optimizer, schedule, state, run=run)
            accelerator.wait_for_everyone()
        if cfg.stop_at and step >= cfg.stop_at and step < cfg.steps:
            if main:
                save_checkpoint(ckpt_last, accelerator.unwrap_model(model), optimizer, schedule, state, run=run)
            accelerator.wait_for_everyone()
            log.info("stopped at step %d (--stop-at); continue with --resume", step)
            break
    bar.close()

    elapsed = t_train + t_wait
    if state["step"] < cfg.steps:  # --stop-at: the run is not finished, no results.json
        if main:
            writer.close()
        return {"steps": state["step"], "stopped": True, "history": state["history"]}
    results = {
        "best": state["best"], "last": state["history"][-1] if state["history"] else None,
        "steps_per_s": steps_done / elapsed if elapsed else None,
        "samples_per_s": samples / elapsed if elapsed else None,
        "stream_wait_fraction": t_wait / elapsed if elapsed else None,
        "step_time_s": t_train / steps_done if steps_done else None,
        "steps": state["step"], "params": n_params, "flops_per_step": flops,
        "device": str(accelerator.device), "num_processes": accelerator.num_processes,
        "checkpoints": {"last": str(ckpt_last), "best": str(ckpt_best)}, "tensorboard": str(out / "tb"),
        "config": cfg.to_dict(), "history": state["history"],
    }
    if main:
        writer.close()
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, out / "results.json")
    accelerator.wait_for_everyone()
    return results
