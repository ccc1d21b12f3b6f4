"""Scoring a model: the official VQA accuracy over a side of the shards (during training and by
``fuse-eval``), over a VQA split read from its questions file (with a results file for the
evaluation server), and one answer to one question about one image.

Speed: answers are decoded greedily by HF ``generate`` over whole batches, the fused encoder run
once per batch and the decoder's keys and values cached, so a question costs about one encoder
forward plus a decoder step per answer token. On a CPU, torch runs as many threads as the training
step does (:meth:`TrainConfig.cpu_threads <pipelines.train.config.TrainConfig.cpu_threads>`: the
cores left after the stream's workers), not torch's default of one per core: on a 2-core machine
busy with other work, 2 threads scored 53 questions/s and 1 thread 650-780. ``bench/eval_bench.py``
measures the evaluation against the training step.
"""

import dataclasses
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from ..data.tokens import decode_batch
from ..errors import PipelineError
from ..files import write_atomic
from ..metrics.vqa import VQAScore
from .config import TrainConfig
from .model import model_inputs

SIDES = ("eval", "select", "train")


@contextmanager
def torch_threads(threads):
    """torch's CPU threads set to ``threads`` for the block (``None``: left as they are)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress_bar(total: int, progress, desc: str):
    from tqdm import tqdm

    # progress None: tqdm shows the bar only on a terminal
    return tqdm(total=total, unit="q", desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=None if progress is None else not progress,
                mininterval=0.5 if sys.stderr.isatty() else 30)


@torch.inference_mode()
def evaluate(model, loader, tokenizer, modalities, accelerator, max_new_tokens: int, progress=None,
             threads=None, predictions: list | None = None, desc: str = "eval") -> dict:
    """VQA accuracy and exact match (overall, by answer type and by question type) over this rank's
    share of ``loader``, summed over ranks. Questions without answers (a test split) are answered
    and not scored.

    Args:
        model: the (possibly wrapped) fused T5.
        loader: eval batches (:func:`pipelines.data.stream.eval_loader`; its ``limit`` bounds them).
        tokenizer: decodes the generated answers.
        modalities: the fused modalities (the model's inputs).
        accelerator: the run's ``accelerate.Accelerator``.
        max_new_tokens: answer length limit.
        progress: a progress bar with the rate on stderr: True, False, or None (only on a terminal).
        threads: torch CPU threads during the evaluation (``None``: as they are).
        predictions: if a list, ``(question_id, answer)`` of this rank's questions are appended to it,
            in order.
        desc: the progress bar's label.
    """
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    score = VQAScore()
    with torch_threads(threads), _progress_bar(len(loader.loader.dataset), progress, desc) as bar:
        for batch in loader:
            with accelerator.autocast():
                ids = unwrapped.generate(modalities=model_inputs(batch, modalities, accelerator.device),
                                         max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
            answers = decode_batch(tokenizer, ids)
            scored = [i for i, refs in enumerate(batch["answers"]) if refs]
            score.add_batch([answers[i] for i in scored], [batch["answers"][i] for i in scored],
                            [batch["answer_type"][i] for i in scored], [batch["question_type"][i] for i in scored])
            if predictions is not None:
                predictions.extend(zip(batch["question_id"].tolist(), answers))
            bar.update(len(answers))
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


@dataclasses.dataclass
class ScoreConfig:
    """What ``fuse-eval`` scores. Field names are the CLI flags.

    Attributes:
        shards, caches: the shard folder and the caches (default: the run's own).
        side: the side of the shards to score (``eval``, ``select``, ``train``; default ``eval``).
        split: a VQA split to score instead, read from its questions file in ``vqa_dir`` (``val``,
            ``test-dev``, ...); a split without annotations is answered, not scored.
        vqa_dir: the folder of ``split``'s files (default: the one the shards were made from).
        batch_size: questions per batch.
        limit: score the first N questions (``None`` or 0: all).
        allow_missing: drop questions whose id a cache lacks (on if the run trained so).
        results_file: write every answer there as the VQA evaluation server wants it.
        progress: a progress bar on stderr (``None``: only on a terminal).
        threads: torch CPU threads (default: those of the run's training step).
    """

    shards: str | None = None
    caches: dict | None = None
    side: str | None = None
    split: str | None = None
    vqa_dir: str | None = None
    batch_size: int = 128
    limit: int | None = None
    allow_missing: bool = False
    results_file: str | None = None
    progress: bool | None = None
    threads: int | None = None

    def __post_init__(self):
        if self.side is not None and self.split is not None:
            raise ValueError(f"--side {self.side} and --split {self.split}: score a side of the shards or a VQA "
                             "split, not both")
        if self.side is not None and self.side not in SIDES:
            raise ValueError(f"--side {self.side}: choose one of {', '.join(SIDES)}")
        if self.vqa_dir is not None and self.split is None:
            raise ValueError("--vqa-dir: only with --split (the shards' sides are read from --shards)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: must be a positive integer")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 0):
            raise ValueError(f"--limit {self.limit}: must be 0 (all) or a positive integer")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"--threads {self.threads}: must be a positive integer")

    def what(self) -> str:
        """``val split`` or ``eval side``: what is scored, for messages."""
        return f"{self.split} split" if self.split else f"{self.side or 'eval'} side"


def split_records(cfg: TrainConfig, config: ScoreConfig) -> tuple:
    """``(records as dicts, VQA folder)`` of ``config.split``, with or without annotations."""
    from ..data.shards import read_manifest
    from ..data.vqa import read_split

    vqa_dir = config.vqa_dir
    if vqa_dir is None:
        try:
            vqa_dir = read_manifest(cfg.shards)["source"]
        except PipelineError as e:
            raise PipelineError(f"--split {config.split}: give the VQA folder with --vqa-dir (the shards' "
                                f"source is unknown: {e})") from None
    records = read_split(vqa_dir, config.split, check_images=False, require_annotations=False)
    return [r.to_dict() for r in records], vqa_dir


def score(model, run: dict, tokenizer, config: ScoreConfig | None = None) -> dict:
    """Score a checkpoint on a side of a shard folder or on a VQA split (``fuse-eval``).

    Args:
        model, run, tokenizer: from :func:`pipelines.train.checkpoint.load_checkpoint`.
        config: what to score (default: the eval side of the run's shards).

    Returns:
        The summary of :func:`evaluate` with ``answered`` (questions answered: scored ones and those
        without annotations) and ``scored`` (what was scored, e.g. ``val split``).
    """
    from accelerate import Accelerator

    from ..data.stream import eval_loader
    from ..data.vqa import questions_path
    from .streams import eval_stream_config, stream_configs

    config = config or ScoreConfig()
    cfg = run_config(run, shards=config.shards, caches=config.caches, eval_batch_size=config.batch_size,
                     allow_missing=config.allow_missing or None)
    accelerator = Accelerator()
    model = model.to(accelerator.device)
    threads = config.threads or (cfg.cpu_threads() if accelerator.device.type == "cpu" else None)
    if config.split:
        records, vqa_dir = split_records(cfg, config)
        # the records are given: the config's shards only name where they come from
        sc = eval_stream_config(cfg, [str(questions_path(vqa_dir, config.split))])
    else:
        records = None
        _, sc = stream_configs(cfg, eval_side=config.side or "eval")
    sc = dataclasses.replace(sc, tokenizer=run["tokenizer"])  # the checkpoint's copy of a tokenizer folder
    loader = eval_loader(sc, 0, 1, records=records, limit=config.limit)
    predictions = [] if config.results_file else None
    summary = evaluate(model, loader, tokenizer, model.config.fusion().modalities(), accelerator,
                       cfg.max_new_tokens, progress=config.progress, threads=threads, predictions=predictions,
                       desc=config.what())
    summary["answered"] = len(loader.loader.dataset)
    summary["scored"] = config.what()
    if config.results_file:
        write_results_file(config.results_file, predictions)
        summary["results_file"] = str(config.results_file)
    return summary


def write_results_file(path, predictions) -> None:
    """The VQA evaluation server's results format: ``[{"question_id": int, "answer": str}, ...]``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps([{"question_id": int(qid), "answer": answer} for qid, answer in predictions]))


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
