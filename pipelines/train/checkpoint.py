"""Checkpoints of a run: written whole or not at all, resumed exactly, loaded by ``fuse-eval``.

A checkpoint folder holds the model (``save_pretrained``: safetensors and ``config.json``),
``fuse_run.json`` (the run's config, the caches' producers, the tokenizer, a copy of a tokenizer
folder), ``trainer_state.json`` (step, stream position, best and history) and, for ``last``,
``train_state.pt`` (optimizer, schedule and RNG: tensors and plain numbers, read back with
``weights_only=True``, never unpickling objects).
"""

import json
import shutil
from pathlib import Path

import torch

from fuse import FusionT5ForConditionalGeneration

from ..data.tokens import load_tokenizer
from ..errors import PipelineError
from ..files import existing_dir, replace_dir

RUN_FILE = "fuse_run.json"
RUN_TOKENIZER = "tokenizer"
TRAINER_STATE = "trainer_state.json"
TRAIN_STATE = "train_state.pt"


def checkpoint_dirs(out) -> tuple[Path, Path]:
    """``(last, best)`` checkpoint folders of a run directory."""
    root = Path(out) / "checkpoints"
    return root / "last", root / "best"


def has_checkpoint(path: Path) -> bool:
    return (existing_dir(path) / TRAINER_STATE).is_file()


def save_checkpoint(path: Path, model, optimizer=None, schedule=None, state=None, run=None) -> None:
    """Write a checkpoint to ``path`` through a temporary folder renamed into place.

    Args:
        path: the checkpoint folder.
        model: the (unwrapped) fused T5.
        optimizer, schedule: saved for ``--resume`` when given.
        state: the trainer state (JSON).
        run: the run record (config, producers, tokenizer, text modality) that lets a checkpoint
            alone answer questions (``fuse-eval``).
    """
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
                    "torch_rng": torch.get_rng_state()}, tmp / TRAIN_STATE)
    (tmp / TRAINER_STATE).write_text(json.dumps(state or {}, indent=2))
    replace_dir(tmp, path)


def read_checkpoint_json(path: Path, name: str) -> dict:
    """A JSON file of a checkpoint folder (``fuse_run.json``, ``trainer_state.json``) as a dict.

    Raises:
        PipelineError: missing or unreadable.
    """
    file = existing_dir(path) / name
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{file}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{file}: expected a JSON object")
    return data


def load_train_state(path: Path, optimizer, schedule) -> dict:
    """Restore optimizer, schedule and RNG from a ``last`` checkpoint; returns its trainer state."""
    path = existing_dir(path)
    blob = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    schedule.load_state_dict(blob["schedule"])
    torch.set_rng_state(blob["torch_rng"])
    return json.loads((path / TRAINER_STATE).read_text())


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run directory (its best checkpoint, else its last)."""
    path = Path(path)
    last, best = checkpoint_dirs(path)
    for candidate in (path, existing_dir(best), existing_dir(last)):
        if (candidate / "config.json").is_file() and (candidate / RUN_FILE).is_file():
            return candidate
    raise PipelineError(f"{path}: not a fuse-train checkpoint or run directory (no {RUN_FILE})")


def load_checkpoint(path):
    """``(model, run record, tokenizer, checkpoint folder)`` of a checkpoint written by ``fuse-train``."""
    ckpt = resolve_checkpoint(path)
    run = json.loads((ckpt / RUN_FILE).read_text())
    if (ckpt / run["tokenizer"]).is_dir():  # a tokenizer folder copied into the checkpoint
        run["tokenizer"] = str(ckpt / run["tokenizer"])
    tokenizer = load_tokenizer(run["tokenizer"])
    model = FusionT5ForConditionalGeneration.from_pretrained(ckpt).eval()
    return model, run, tokenizer, ckpt
