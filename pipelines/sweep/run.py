"""Running a sweep: every unfinished grid point trained in turn, then the summary and figures.

The runs go one after the other in this process, each through :func:`pipelines.train.loop.train`
(:func:`run_one`), or, with ``--executor local|slurm``, as submitit jobs that each run
:func:`run_one` (:mod:`pipelines.sweep.jobs`); a point whose job is queued or running is left alone.
A run that raises (its loss diverged, or any other error) is recorded as failed (``failed.json``
with the reason) and the sweep goes on to the next point. A rerun skips finished runs (whole
``results.json`` with the same settings), keeps failed ones unless asked to retry, continues
broken ones (a folder without a whole ``results.json``: killed mid-run) from their last checkpoint
when they were started with the same settings and redoes the others, so a sweep survives being
killed.
"""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from ..errors import SweepError, TrainingDiverged
from ..train.config import TrainConfig
from .checks import resumable
from .grid import FAILED, RUNS
from .jobs import live, point_states, run_jobs
from .plan import SweepConfig, plan
from .report import report

log = logging.getLogger(__name__)


def prepare_shards(cfg: SweepConfig) -> None:
    """``--vqa``: write ``out/qa`` from the VQA folder (split by ``cfg.split_by``) unless a finished one
    is there.

    Raises:
        SweepError: the one there was split otherwise.
    """
    from ..data.shards import MANIFEST, write_qa_shards

    qa = Path(cfg.out) / "qa"
    split_by = cfg.split_by or "image"
    if (qa / MANIFEST).is_file():
        try:
            written = json.loads((qa / MANIFEST).read_text()).get("split_by", "image")
        except (OSError, ValueError, AttributeError) as e:
            raise SweepError(f"{qa / MANIFEST}: unreadable ({e}); delete {qa} to write it again") from None
        if written != split_by:
            raise SweepError(f"--split-by {split_by}: {qa} was split by {written}; sweep into another --out, "
                             f"or delete {qa} (and the runs trained on it) to split it again")
        log.info("shards: reusing %s (split by %s)", qa, split_by)
        return
    if qa.exists():
        log.warning("shards: %s is incomplete (no %s): writing it again", qa, MANIFEST)
        shutil.rmtree(qa)
    manifest = write_qa_shards(cfg.vqa, qa, split_by=split_by)
    log.info("shards: %d train / %d eval questions from %s -> %s (split by %s)", manifest["train"]["count"],
             manifest["eval"]["count"], cfg.vqa, qa, split_by)


def failure_reason(error: Exception) -> str:
    """What ``failed.json`` says of a run that raised ``error``: ``diverged: ...`` for a loss that
    stopped being finite, else the exception's type and message (``IndexError: list index out of range``)."""
    if isinstance(error, TrainingDiverged):
        return f"diverged: {error}"
    message = " ".join(str(error).split())  # one line: summary.md lists it, the traceback goes to the log
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def record_failure(run_dir: Path, name: str, error: Exception) -> None:
    """Write ``failed.json`` for a run that raised ``error``, and log it (with the traceback unless
    the loss diverged, which is a result, not a bug)."""
    reason = failure_reason(error)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).write_text(json.dumps({"reason": reason}, indent=2) + "\n")
    if isinstance(error, TrainingDiverged):
        log.error("run %s failed: %s", name, reason)
    else:
        log.error("run %s failed: %s", name, reason, exc_info=error)


def run_sweep(cfg: SweepConfig, train_fn=None, planned: tuple = None) -> dict:
    """Run every unfinished grid point, then write the summary and figures.

    A broken run (killed, or still running elsewhere) goes on from its last checkpoint when
    :func:`resumable`; otherwise it is deleted and done again, as is a failed one with
    ``retry_failed``. A run that raises is recorded as failed (:func:`record_failure`) and the
    sweep goes on: one point's error (a diverged loss, a bug, a bad checkpoint) costs that point,
    not the grid and its summary.

    Args:
        cfg: the sweep.
        train_fn: the training function (default :func:`pipelines.train.loop.train`), called as
            ``train_fn(run_config, train_checked=True)``.
        planned: what :func:`plan` returned for ``cfg``, if the caller has it already.

    Returns:
        The summary (:func:`pipelines.sweep.report.report`) with ``ran``, ``skipped``, ``resumed``,
        ``redone`` and ``newly_failed`` (run names) added.

    Raises:
        GridError, ValueError: an impossible grid point or setting, before any training.
        SweepError: the runs directory holds runs with other settings.
        PipelineError, store.StoreError: the data or cache cannot be read.
    """
    from ..data.stream import check_stream
    from ..train.streams import stream_configs

    base, todo = planned or plan(cfg)
    out, runs_root = Path(cfg.out), Path(cfg.out) / RUNS
    runs_root.mkdir(parents=True, exist_ok=True)
    if cfg.vqa:
        prepare_shards(cfg)
    check_stream(stream_configs(base, 1)[0])  # caches match, every id present: once, before any training
    (out / "sweep.json").write_text(json.dumps({"sweep": dataclasses.asdict(cfg), "base": base.to_dict(),
                                                "runs": [p.name for p, _, _ in todo]}, indent=2) + "\n")
    ran, skipped, resumed, redone, newly_failed = [], [], [], [], []
    pending = [(p, s, r) for p, s, r in todo if s == "todo" or s == "broken" or (s == "failed" and cfg.retry_failed)]
    log.info("sweep: %d run(s) in the grid, %d to run, %d finished, %d failed before", len(todo), len(pending),
             sum(s == "finished" for _, s, _ in todo), sum(s == "failed" for _, s, _ in todo))
    for note in cfg.skipped_ablations():
        log.warning("%s", note)
    for point, status, reason in todo:
        if status == "finished" or (status == "failed" and not cfg.retry_failed):
            log.info("skip %s: %s", point.name, "finished" if status == "finished" else f"failed before ({reason}); "
                     "--retry-failed redoes it")
            skipped.append(point.name)
    in_flight = [p.name for p, _, _ in pending if live(out, p.name)]
    for name in in_flight:
        log.info("skip %s: its job is queued or running", name)
    pending = [(p, s, r) for p, s, r in pending if p.name not in in_flight]
    if cfg.executor.kind != "serial":
        jobs = run_jobs(cfg.executor, out, [(p.name, cfg.run_config(base, p)) for p, _, _ in pending])
        summary = report(out)
        states = {row["run"]: row["status"] for row in point_states(out, [p.name for p, _, _ in todo])}
        return {**summary, "ran": [n for n in jobs["submitted"] if states[n] == "finished"], "skipped": skipped,
                "resumed": [], "redone": [], "in_flight": in_flight, "submitted": jobs["submitted"],
                "newly_failed": [n for n in jobs["submitted"] if states[n] == "failed"]}
    for i, (point, status, reason) in enumerate(pending, 1):
        run = cfg.run_config(base, point)
        log.info("run %d/%d %s: --fuse '%s' --pool '%s' --decoder-layers %d --seed %d", i, len(pending),
                 point.name, run.fuse, run.pool, run.decoder_layers, run.seed)
        how, results = run_one(run, point.name, status, reason, train_fn)
        {"resumed": resumed, "redone": redone}.get(how, []).append(point.name)
        (ran if results is not None else newly_failed).append(point.name)
    summary = report(out)
    return {**summary, "ran": ran, "skipped": skipped, "resumed": resumed, "redone": redone,
            "newly_failed": newly_failed, "in_flight": in_flight, "submitted": {}}


def run_one(run: TrainConfig, name: str, status: str, reason: str, train_fn=None, reraise: bool = False) -> tuple:
    """Train one grid point, in this process (a serial sweep, or a job: :mod:`pipelines.sweep.jobs`).

    A broken run goes on from its last checkpoint when :func:`resumable`, else it is deleted and done
    again, as is a failed one; an error is recorded in ``failed.json`` (:func:`record_failure`).

    Returns:
        ``(how, results)``: how is ``new``, ``resumed`` or ``redone``; results None if it failed.

    Raises:
        Exception: the training's error, after recording it, when ``reraise``.
    """
    if train_fn is None:
        from ..train.loop import train as train_fn
    run_dir, how = Path(run.out), "new"
    if status == "broken" and resumable(run_dir, run):
        log.warning("resume %s from its last checkpoint: %s", name, reason)
        run, how = dataclasses.replace(run, resume=True), "resumed"
    elif status in ("broken", "failed"):
        log.warning("redo %s: %s", name, reason)
        shutil.rmtree(run_dir)
        how = "redone"
    try:
        results = train_fn(run, train_checked=True)
    except Exception as e:  # noqa: BLE001 - a point's failure is its result; the grid goes on (Ctrl-C stops it)
        record_failure(run_dir, name, e)
        if reraise:
            raise
        return how, None
    log.info("run %s: best accuracy %.2f%%, last %.2f%%, %.2f steps/s", name,
             100 * results["best"]["accuracy"], 100 * results["last"]["accuracy"], results["steps_per_s"])
    return how, results
