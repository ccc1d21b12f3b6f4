"""The ``fuse-train`` options, defined once: ``fuse-train`` takes them all, ``fuse-sweep run`` every one
that is not the grid's own or a run's own, so both commands accept the same flags with the same help."""

import click

from ..train.config import (
    IMAGE_SOURCES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    TRAIN_PRESETS,
)



def _text_len(ctx, param, values):
    """``--text-len FIELD=TOKENS`` options -> ``{field: tokens}`` (``None``: not given)."""
    out = {}
    for item in values:
        name, sep, n = item.partition("=")
        if not sep or not name or not n.strip().isdigit():
            raise click.BadParameter(f"{item}: expected FIELD=TOKENS, e.g. --text-len title=32")
        out[name] = int(n)
    return out or None


# (parameter name, flags, click.option keywords), in --help order.
TRAIN_OPTIONS = [
    ("shards", ("--shards",), dict(type=click.Path(exists=True, file_okay=False),
                                    help="Folder written by `vqa-data shards`.")),
    ("caches", ("--cache", "caches"), dict(multiple=True, metavar="FIELD=PATH",
                                           help="An embedding cache per vector field, looked up by its own id.")),
    ("out", ("--out",), dict(type=click.Path(file_okay=False), help="Run directory.  [default: runs/train]")),
    ("preset", ("--preset",), dict(type=click.Choice(sorted(TRAIN_PRESETS)),
                                   help="Named settings; flags override them.")),
    ("config_file", ("--config", "config_file"), dict(type=click.Path(dir_okay=False),
                                                      help="A YAML or JSON file of settings.")),
    ("t5", ("--t5",), dict(help="T5: a preset of fuse.T5_PRESETS (random init), a hub name or a local directory.")),
    ("tokenizer", ("--tokenizer",), dict(help="byt5 (no files) or a Hugging Face tokenizer name or folder.")),
    ("fuse", ("--fuse",), dict(help='Fusion spec: "LAYER:FIELD[,FIELD] ...", e.g. "0:question 6:image" or '
                                    '"0:title,question 4:image 7:audio": the data\'s text fields, and vector fields '
                                    'with a --cache.')),
    ("text_len", ("--text-len",), dict(multiple=True, metavar="FIELD=TOKENS", callback=_text_len,
                                       help="A text field's token limit (repeat per field).  [default: 128]")),
    ("pool", ("--pool",), dict(help='Pooling: "MODALITY:TYPE[:LENGTH] ...", e.g. "image:attention:14".')),
    ("positions", ("--positions",), dict(metavar="MODALITY[,MODALITY]",
                                         help='Vector modalities whose tokens get a learned position embedding, '
                                              'e.g. "image" ("": none).')),
    ("decoder_layers", ("--decoder-layers",), dict(type=int, help="Decoder depth: the first N blocks of a "
                                                                 "pretrained T5 (1 to its depth), or N random "
                                                                 "ones for a preset.")),
    ("steps", ("--steps",), dict(type=int, help="Optimizer steps.")),
    ("batch_size", ("--batch-size",), dict(type=int, help="Samples per process per micro-batch.")),
    ("grad_accum", ("--grad-accum",), dict(type=int, help="Micro-batches per optimizer step.")),
    ("lr", ("--lr",), dict(type=float, help="Peak learning rate.")),
    ("optimizer", ("--optimizer",), dict(type=click.Choice(OPTIMIZERS))),
    ("schedule", ("--schedule",), dict(type=click.Choice(SCHEDULES))),
    ("warmup", ("--warmup",), dict(type=float, help="Warm-up: a fraction of the steps (< 1) or a number of steps.")),
    ("clip", ("--clip",), dict(type=float, help="Gradient norm clip (0: off).")),
    ("eval_every", ("--eval-every",), dict(type=int, help="Evaluate every N steps (and at the end).")),
    ("eval_limit", ("--eval-limit",), dict(type=int, help="Score the first N questions of the selection side at "
                                                            "each evaluation (0: all).")),
    ("seed", ("--seed",), dict(type=int)),
    ("mixed_precision", ("--mixed-precision",), dict(type=click.Choice(PRECISIONS))),
    ("num_workers", ("--num-workers",), dict(type=int, help="DataLoader workers of the stream.")),
    ("threads", ("--threads",), dict(type=int,
                                     help="torch CPU threads [default: every CPU of the process' share; fewer "
                                          "when other work shares the CPU].")),
    ("compile", ("--compile",), dict(is_flag=True, default=None,
                                     help="torch.compile the training step (pays on a GPU; on a 2-core CPU it "
                                          "measured no faster).")),
    ("pad_multiple", ("--pad-multiple",), dict(type=int, help="Pad text and answer tokens to a multiple of N "
                                                              "[default: 8 with --compile, else 1].")),
    ("image_source", ("--image-source",), dict(type=click.Choice(IMAGE_SOURCES),
                                               help="cache: read the embeddings; online: run the ViT on the images "
                                                    "every step.")),
    ("allow_missing", ("--allow-missing",), dict(is_flag=True, default=None,
                                                 help="Drop questions whose image the cache lacks.")),
    ("resume", ("--resume",), dict(is_flag=True, default=None, help="Continue from OUT/checkpoints/last.")),
    ("stop_at", ("--stop-at",), dict(type=int, help="Stop after step N with a checkpoint (continue later with --resume).")),
    ("overwrite", ("--overwrite",), dict(is_flag=True, default=None, help="Replace a finished run in OUT.")),
]


def train_options(skip=()):
    """Decorator adding the ``fuse-train`` options (all but those named in ``skip``) to a command."""
    names = {name for name, _, _ in TRAIN_OPTIONS}
    unknown = set(skip) - names
    if unknown:
        raise KeyError(f"no fuse-train option {sorted(unknown)}")

    def decorate(fn):
        for name, flags, kw in reversed(TRAIN_OPTIONS):
            if name not in skip:
                fn = click.option(*flags, **kw)(fn)
        return fn

    return decorate


def train_option_names(skip=()) -> list:
    return [name for name, _, _ in TRAIN_OPTIONS if name not in skip]
