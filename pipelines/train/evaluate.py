"""Scoring a model: the official VQA accuracy over a side of the shards (during training and by
``fuse-eval``), and one answer to one question about one image."""

import dataclasses
from pathlib import Path

import torch

from ..data.tokens import decode_batch
from ..errors import PipelineError
from ..metrics.vqa import VQAScore
from .config import TrainConfig
from .model import model_inputs


@torch.inference_mode()
def evaluate(model, loader, tokenizer, modalities, accelerator, max_new_tokens: int, limit=None) -> dict:
    """VQA accuracy and exact match (overall, by answer type and by question type) over this rank's
    share of ``loader``, summed over ranks.

    Args:
        model: the (possibly wrapped) fused T5.
        loader: eval batches (:func:`pipelines.data.stream.eval_loader`).
        tokenizer: decodes the generated answers.
        modalities: the fused modalities (the model's inputs).
        accelerator: the run's ``accelerate.Accelerator``.
        max_new_tokens: answer length limit.
        limit: stop after about this many questions (``None`` or 0: all).
    """
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


def run_config(run: dict, **overrides) -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint was trained with (settings this version does not know are
    left out), with ``overrides`` (``None`` values are not given)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in run["config"].items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def score(model, run: dict, tokenizer, shards=None, caches=None, side: str = "eval", batch_size: int = 128,
          limit=None, allow_missing: bool = False) -> dict:
    """Score a checkpoint on a side of a shard folder (``fuse-eval``).

    Args:
        model, run, tokenizer: from :func:`pipelines.train.checkpoint.load_checkpoint`.
        shards, caches: default to the run's own.
        side: ``eval`` or ``train``.
        batch_size, limit: eval batch size; stop after about ``limit`` questions.
        allow_missing: drop questions whose id a cache lacks (on if the run trained so).
    """
    from accelerate import Accelerator

    from ..data.stream import eval_loader
    from .streams import stream_configs

    cfg = run_config(run, shards=shards, caches=caches, eval_batch_size=batch_size,
                     allow_missing=allow_missing or None)
    _, sc = stream_configs(cfg, eval_side=side)
    sc = dataclasses.replace(sc, tokenizer=run["tokenizer"])  # the checkpoint's copy of a tokenizer folder
    accelerator = Accelerator()
    return evaluate(model, eval_loader(sc, 0, 1), tokenizer, model.config.fusion().modalities(), accelerator,
                    cfg.max_new_tokens, limit)


def answer_one(model, run: dict, tokenizer, image: str, question: str, max_new_tokens: int = 16) -> str:
    """Run the cache's ViT on ``image`` and the fused T5 on it and ``question``."""
    from ..data.online import ImageEmbedder, load_vit

    text = run["text_modality"]
    ids, mask = tokenizer.encode_batch([question], max_length=128)
    inputs = {text: (ids, mask)}
    for name in model.config.fusion().modalities():
        if name == text:
            continue
        if name not in run["producers"]:
            raise PipelineError(f"modality {name!r}: the checkpoint does not record how its embeddings were made")
        embedder = ImageEmbedder(load_vit(run["producers"][name]), vqa_dir=Path("."))
        inputs[name] = embedder.embed_paths([image])
    with torch.inference_mode():
        out = model.generate(modalities=inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    return decode_batch(tokenizer, out)[0]
