"""The model side of a run: the fused T5 of a :class:`~pipelines.train.config.TrainConfig`, its
inputs from a stream batch, the optimizer and the learning-rate schedule."""

import torch

from fuse import T5_PRESETS, FusionT5Config, FusionT5ForConditionalGeneration

from .config import TrainConfig


def build_model(cfg: TrainConfig, dims: dict, lengths: dict, vocab_size: int) -> FusionT5ForConditionalGeneration:
    """The fused T5 of ``cfg``: a preset architecture with random weights sized to the tokenizer's
    vocabulary, or a pretrained T5.

    Args:
        cfg: the run.
        dims, lengths: ``{modality: feature width}`` and ``{modality: tokens}`` of the caches.
        vocab_size: the tokenizer's vocabulary (for a preset architecture).
    """
    fused = cfg.fused_modalities()
    fusion = dict(fusion_spec=cfg.fuse, pool=cfg.pool or None, text_modalities=cfg.text_fields(),
                  modality_dims={k: v for k, v in dims.items() if k in fused},
                  modality_lengths={k: v for k, v in lengths.items() if k in fused},
                  modality_positions=cfg.position_modalities())
    if cfg.t5 in T5_PRESETS:
        overrides = {} if cfg.decoder_layers is None else {"num_decoder_layers": cfg.decoder_layers}
        config = FusionT5Config.from_name(cfg.t5, dropout_rate=cfg.dropout, vocab_size=vocab_size, **fusion,
                                          **overrides)
        return FusionT5ForConditionalGeneration(config)
    return FusionT5ForConditionalGeneration.from_t5(cfg.t5, decoder_layers=cfg.decoder_layers,
                                                    config_overrides={"dropout_rate": cfg.dropout}, **fusion)


def model_inputs(batch: dict, modalities, device) -> dict:
    """The ``modalities`` argument of the fused T5 from a stream batch (only the fused ones): a text
    field's ``(ids, mask)``, a vector field's values as float32."""
    out = {}
    for name in modalities:
        if name in batch["tokens"]:
            ids, mask = batch["tokens"][name]
            out[name] = (ids.to(device, non_blocking=True), mask.to(device, non_blocking=True))
        else:
            out[name] = batch["vectors"][name].to(device, non_blocking=True).float()
    return out


def make_optimizer(cfg: TrainConfig, model):
    """AdamW (or Adafactor) with no weight decay on biases, norms and embeddings. AdamW is torch's
    fused kernel (one kernel over all parameters; its state is the same as the loop's): on the demo
    step of a 2-core CPU the step ran 1.04-1.06x faster than with the default."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name or "embedding" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, fused=True)


def make_schedule(cfg: TrainConfig, optimizer):
    from transformers import get_scheduler

    return get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps(),
                         num_training_steps=cfg.steps)
