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

from ..data.example import DEFAULT_TEXT_LEN
from ..data.tokens import decode_batch
from ..errors import PipelineError
from ..files import write_atomic
from ..metrics.labels import RANKED_METRICS
from ..metrics.vqa import make_score
from .config import TrainConfig
from .model import model_inputs
from .ranking import candidate_log_likelihoods, candidate_tokens

SIDES = ("eval", "select", "train")
CANDIDATE_MAX_TOKENS = 1024  # a closed-set label is scored whole (VGGSound's longest is 39 bytes)


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


def scored_labels(loader, accelerator) -> list:
    """The closed label set when none is given: every reference of the scored examples (all ranks'),
    sorted. On the published sets' eval splits that is the whole set (VGGSound's test split and
    AudioSet's eval segments hold every class); ``fuse-eval`` and ``fuse-train`` give the manifest's list."""
    names = sorted({r for rec in getattr(loader.loader.dataset, "records", ()) for r in rec.get("references", ())})
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        names = sorted({n for part in gather_object([names]) for n in part})
    return names


@torch.inference_mode()
def evaluate(model, loader, tokenizer, modalities, accelerator, max_new_tokens: int, progress=None,
             threads=None, predictions: list | None = None, desc: str = "eval", metric: str = "vqa",
             labels: list | None = None) -> dict:
    """The data's metric (VQA accuracy, or ``exact``: a match with a label) and exact match, overall
    and by the examples' groups (VQA: by answer type and by question type; any other group name too), over this rank's share of
    ``loader``, summed over ranks. Examples without references (a test split) are answered and not
    scored.

    Args:
        model: the (possibly wrapped) fused T5.
        loader: eval batches (:func:`pipelines.data.stream.eval_loader`; its ``limit`` bounds them).
        tokenizer: decodes the generated answers.
        modalities: the fused modalities (the model's inputs).
        accelerator: the run's ``accelerate.Accelerator``.
        max_new_tokens: answer length limit.
        progress: a progress bar with the rate on stderr: True, False, or None (only on a terminal).
        threads: torch CPU threads during the evaluation (``None``: as they are).
        predictions: if a list, ``(example id, answer)`` of this rank's examples are appended to it,
            in order.
        desc: the progress bar's label.
        metric: ``vqa``, ``exact``, ``caption``, ``label`` or ``multilabel`` (the shards' manifest says
            which).
        labels: the closed label set of ``label`` and ``multilabel`` (the manifest's ``labels``), whose
            likelihoods are ranked (:mod:`pipelines.train.ranking`); default: :func:`scored_labels`.
    """
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    ranked = metric in RANKED_METRICS
    if ranked:
        labels = list(labels) if labels else scored_labels(loader, accelerator)
        # each label whole (not cut at the answer length): its likelihood, not a prefix's
        candidates, _ = candidate_tokens(tokenizer, labels, CANDIDATE_MAX_TOKENS, accelerator.device)  # (C, T)
    score = make_score(metric, labels=labels if ranked else None)
    with torch_threads(threads), _progress_bar(len(loader.loader.dataset), progress, desc) as bar:
        for batch in loader:
            likelihoods = None
            with accelerator.autocast():
                inputs = model_inputs(batch, modalities, accelerator.device)
                if ranked:  # the encoder once, for the answer and for every label's likelihood
                    encoded = unwrapped.encode(inputs)
                    ids = unwrapped.generate(encoder_outputs=encoded, max_new_tokens=max_new_tokens, num_beams=1,
                                             do_sample=False)
                    likelihoods = candidate_log_likelihoods(unwrapped, encoded, candidates).cpu().numpy()  # (B, C)
                else:
                    ids = unwrapped.generate(modalities=inputs, max_new_tokens=max_new_tokens, num_beams=1,
                                             do_sample=False)
            answers = decode_batch(tokenizer, ids)
            for i, refs in enumerate(batch["references"]):
                if refs:
                    groups = batch["groups"][i]
                    extra = {"scores": likelihoods[i]} if ranked else {}
                    score.add(answers[i], refs, groups.get("answer_type") or "all", groups.get("question_type", ""),
                              groups=groups, **extra)
            if predictions is not None:
                predictions.extend(zip(batch["id"], answers))
            bar.update(len(answers))
    unwrapped.train(was_training)
    if accelerator.num_processes > 1:
        total = make_score(metric, labels=labels if ranked else None)
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
    """``(examples as dicts, VQA folder)`` of ``config.split``, with or without annotations."""
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
    return [r.to_example().to_dict() for r in records], vqa_dir


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
                       desc=config.what(), metric="vqa" if config.split else run_metric(run, cfg),
                       labels=None if config.split else run_labels(cfg))
    summary["answered"] = len(loader.loader.dataset)
    summary["scored"] = config.what()
    if config.results_file:
        write_results_file(config.results_file, predictions)
        summary["results_file"] = str(config.results_file)
    return summary


def run_metric(run: dict, cfg: TrainConfig) -> str:
    """The metric of a run's data: its checkpoint's record, else its shards' manifest."""
    if "metric" in run:
        return run["metric"]
    from ..data.shards import read_manifest

    return read_manifest(cfg.shards).get("metric", "vqa")


def run_labels(cfg: TrainConfig) -> list | None:
    """The closed label set of the shards scored (their manifest's ``labels``), if they have one."""
    from ..data.shards import read_manifest

    try:
        return read_manifest(cfg.shards).get("labels")
    except PipelineError:
        return None


def write_results_file(path, predictions) -> None:
    """The VQA evaluation server's results format: ``[{"question_id": int, "answer": str}, ...]`` (an id
    that is not an integer, of another dataset, is written as it is)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps([{"question_id": int(qid) if isinstance(qid, int) or str(qid).isdigit() else qid,
                                    "answer": answer} for qid, answer in predictions]))


def answer_one(model, run: dict, tokenizer, texts: dict, files: dict, max_new_tokens: int = 16) -> str:
    """The fused T5's answer for one example given by hand: each text field's text, and each vector
    field's file, embedded by the model that made its cache (rebuilt from the cache's metadata; an
    image field's ViT).

    Args:
        texts: text field -> text (``fuse-eval --field question="..."``).
        files: vector field -> file (``--file image=PATH``).

    Raises:
        ValueError: a field the model fuses is not given, or one it does not fuse is (exit 2).
        PipelineError: the checkpoint does not record how a field's embeddings were made.
    """
    from ..data.online import embed_file

    cfg = model.config
    fused = cfg.fusion().modalities()
    lens = run.get("text_fields") or {}  # older runs: the question, at the default limit
    wanted_texts = [n for n in fused if cfg.is_text(n)]
    wanted_files = [n for n in fused if not cfg.is_text(n)]
    for name in texts:
        if name not in wanted_texts:
            raise ValueError(f"--field {name}: the model fuses no text field {name!r} (its text fields: "
                             f"{', '.join(wanted_texts) or 'none'})")
    for name in files:
        if name not in wanted_files:
            raise ValueError(f"--file {name}: the model fuses no vector field {name!r} (its vector fields: "
                             f"{', '.join(wanted_files) or 'none'})")
    missing = [f"--field {n}=TEXT" for n in wanted_texts if n not in texts] + \
              [f"--file {n}=PATH" for n in wanted_files if n not in files]
    if missing:
        raise ValueError(f"the model fuses {', '.join(fused)}: give {', '.join(missing)} too")
    inputs = {}
    for name in wanted_texts:
        inputs[name] = tokenizer.encode_batch([texts[name]], max_length=lens.get(name, DEFAULT_TEXT_LEN))
    for name in wanted_files:
        producer = run["producers"].get(name)
        if producer is None:
            raise PipelineError(f"vector field {name!r}: the checkpoint does not record how its embeddings were made")
        inputs[name] = embed_file(producer, files[name])  # (1, L, D), as embed made the cache's values
    with torch.inference_mode():
        out = model.generate(modalities=inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    return decode_batch(tokenizer, out)[0]
