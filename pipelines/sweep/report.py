"""The summary of a sweep, rebuilt from its run directories alone (``fuse-sweep report``).

Every run directory under ``RUNS_DIR/runs/`` is read and classified:

- *finished*: ``results.json`` is whole and has what the summary needs;
- *failed*: ``failed.json`` (the training diverged or raised; kept, not retried by default);
- *broken*: no ``results.json`` (killed, or still running), one that cannot be read, or one marked
  ``stopped`` (``--stop-at``).

Finished runs are grouped by grid point (fusion layer, decoder layers, pooling) — read from each
run's saved config, not from its folder name — and averaged over repeats (mean and sample standard
deviation). Broken and failed runs are listed, never averaged in. The summary goes to
``summary.json`` / ``summary.csv`` / ``summary.md`` and the figures to ``figures/``
(:mod:`pipelines.sweep.figures`). Accuracies in the summary are percentages (the thesis' unit).
"""

import csv
import io
import json
import logging
import math
import shutil
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fuse import T5_PRESETS, FusionConfigError, FusionSpec, coerce_pools

from ..errors import SweepError
from ..files import write_atomic
from ..train.config import TEXT
from .grid import FAILED, FIGURES, RESULTS, RUNS, point_key

log = logging.getLogger(__name__)

# Columns of summary.csv, in order (also the keys of summary.json's "points").
COLUMNS = ("fuse_layer", "decoder_layers", "pool", "pool_type", "pool_length", "repeats",
           "best_accuracy_pct", "best_accuracy_pct_std", "last_accuracy_pct", "last_accuracy_pct_std",
           "steps_per_s", "steps_per_s_std", "samples_per_s", "params", "flops_per_step", "pareto", "runs")


class BrokenRun(Exception):
    """A run directory whose results cannot be used; ``str()`` is the reason."""


@dataclass
class RunRecord:
    """What the summary needs of one finished run (accuracies as fractions)."""

    name: str
    fuse_layer: int
    decoder_layers: int | None
    pool: str
    seed: int
    best_accuracy: float
    best_step: int
    last_accuracy: float
    last_step: int
    steps_per_s: float
    samples_per_s: float
    params: int
    flops_per_step: float
    history: list = field(default_factory=list)  # [(step, accuracy)]
    encoder_layers: int | None = None  # the encoder's depth (late fusion), when known
    tokens: int | None = None  # the swept modality's tokens before pooling, when known

    def key(self) -> tuple:
        return (self.fuse_layer, self.decoder_layers, self.pool)


def swept_modality(config: dict) -> str:
    """The vector modality whose join layer the sweep varies: the first fused one that is not text."""
    names = [n for n in FusionSpec.coerce(config["fuse"]).modalities() if n != TEXT]
    if not names:
        raise BrokenRun(f"config fuse {config['fuse']!r} fuses no vector modality")
    return names[0]


def _number(value, what: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BrokenRun(f"{what} is {value!r}, not a finite number")
    if positive and value <= 0:
        raise BrokenRun(f"{what} is {value!r}, not positive")
    return value


def _eval_entry(results: dict, which: str) -> dict:
    entry = results.get(which)
    if not isinstance(entry, dict):
        raise BrokenRun(f"'{which}' is missing")
    _number(entry.get("accuracy"), f"{which}.accuracy")
    _number(entry.get("step"), f"{which}.step")
    return entry


def read_run(run_dir: Path) -> RunRecord:
    """The record of a finished run.

    Raises:
        BrokenRun: no results.json, or one that is unreadable, malformed or lacks a needed value.
    """
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise BrokenRun(f"no {RESULTS} (the run was killed, or is still running)")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BrokenRun(f"{RESULTS} is unreadable ({e})") from None
    if not isinstance(results, dict):
        raise BrokenRun(f"{RESULTS} holds a {type(results).__name__}, not a mapping")
    if results.get("stopped"):
        raise BrokenRun(f"{RESULTS} is marked stopped at step {results.get('steps')} (--stop-at): not finished")
    config = results.get("config")
    if not isinstance(config, dict) or "fuse" not in config:
        raise BrokenRun(f"{RESULTS} has no saved config")
    try:
        modality = swept_modality(config)
        layer = FusionSpec.coerce(config["fuse"]).layer_of(modality)
        pool = str(coerce_pools(config.get("pool") or None).get(modality, "none"))
    except (FusionConfigError, KeyError, TypeError) as e:
        raise BrokenRun(f"{RESULTS}: config is not a fusion config ({e})") from None
    best, last = _eval_entry(results, "best"), _eval_entry(results, "last")
    history = results.get("history")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise BrokenRun(f"{RESULTS}: 'history' is not a list of evaluations")
    encoder_layers, tokens = _architecture(Path(run_dir), config, modality)
    return RunRecord(
        name=Path(run_dir).name, fuse_layer=layer, decoder_layers=config.get("decoder_layers"), pool=pool,
        seed=config.get("seed", 0), best_accuracy=best["accuracy"], best_step=best["step"],
        last_accuracy=last["accuracy"], last_step=last["step"],
        steps_per_s=_number(results.get("steps_per_s"), "steps_per_s", positive=True),
        samples_per_s=_number(results.get("samples_per_s"), "samples_per_s", positive=True),
        params=int(_number(results.get("params"), "params", positive=True)),
        flops_per_step=_number(results.get("flops_per_step"), "flops_per_step", positive=True),
        history=[(h["step"], _number(h.get("accuracy"), "history accuracy")) for h in history],
        encoder_layers=encoder_layers, tokens=tokens,
    )


def _architecture(run_dir: Path, config: dict, modality: str) -> tuple:
    """``(encoder layers, tokens of the modality)`` from the run's saved model config (for the
    figures' axes only: None where it cannot be read)."""
    try:
        model = json.loads((run_dir / "checkpoints" / "last" / "config.json").read_text())
        return model.get("num_layers"), (model.get("modality_lengths") or {}).get(modality)
    except (OSError, ValueError, AttributeError):
        return T5_PRESETS.get(config.get("t5"), {}).get("num_layers"), None


def read_failure(run_dir: Path) -> str | None:
    """The reason a run failed (``failed.json``), or None."""
    path = Path(run_dir) / FAILED
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text()).get("reason", "failed"))
    except (OSError, ValueError, AttributeError) as e:
        return f"failed ({FAILED} unreadable: {e})"


def _finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a readable ``results.json`` not marked ``stopped``."""
    try:
        results = json.loads((Path(run_dir) / RESULTS).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(results, dict) and not results.get("stopped")


def classify(run_dir: Path) -> tuple:
    """``(status, reason, record)`` of a run folder: ``finished`` with its :class:`RunRecord`,
    ``failed`` (a ``failed.json`` and no finished ``results.json``: the loss diverged or the run
    raised, maybe on resuming one that ``--stop-at`` had stopped) or ``broken``."""
    reason = read_failure(run_dir)
    if reason is not None and not _finished(run_dir):
        return "failed", reason, None
    try:
        return "finished", "", read_run(run_dir)
    except BrokenRun as e:
        return "broken", str(e), None


def scan(runs_dir) -> tuple[list, list, list]:
    """``(finished records, failed [{run, reason}], broken [{run, reason}])`` of ``runs_dir/runs``."""
    folder = Path(runs_dir) / RUNS
    if not folder.is_dir():
        raise SweepError(f"{runs_dir}: no {RUNS}/ folder (not a sweep directory, or no run started yet)")
    finished, failed, broken = [], [], []
    for run_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        status, reason, record = classify(run_dir)
        if status == "finished":
            finished.append(record)
        else:
            (failed if status == "failed" else broken).append({"run": run_dir.name, "reason": reason})
    return finished, failed, broken


# ---- aggregation ----------------------------------------------------------------------------------

def _mean_std(values: list) -> tuple:
    """Mean and sample standard deviation (None with a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _r(x, digits: int = 4):
    return None if x is None else round(x, digits)


def pareto_front(points: list) -> set:
    """Indices of the points no other point beats: at most the FLOPs and at least the accuracy,
    better in one (``points``: ``[(flops, accuracy)]``)."""
    front = set()
    for i, (f, a) in enumerate(points):
        if not any((g <= f and b >= a) and (g < f or b > a) for j, (g, b) in enumerate(points) if j != i):
            front.add(i)
    return front


def summarise(records: list) -> list:
    """One row (a dict of :data:`COLUMNS`) per grid point, sorted by fusion layer, decoder, pool."""
    groups = {}
    for r in records:
        groups.setdefault(r.key(), []).append(r)
    rows = []
    for key in sorted(groups, key=point_key):
        runs = sorted(groups[key], key=lambda r: (r.seed, r.name))
        best, best_std = _mean_std([100 * r.best_accuracy for r in runs])
        last, last_std = _mean_std([100 * r.last_accuracy for r in runs])
        speed, speed_std = _mean_std([r.steps_per_s for r in runs])
        kind, _, length = key[2].partition(":")
        rows.append({
            "fuse_layer": key[0], "decoder_layers": key[1], "pool": key[2], "pool_type": kind,
            "pool_length": int(length) if length else None, "repeats": len(runs),
            "best_accuracy_pct": _r(best), "best_accuracy_pct_std": _r(best_std),
            "last_accuracy_pct": _r(last), "last_accuracy_pct_std": _r(last_std),
            "steps_per_s": _r(speed), "steps_per_s_std": _r(speed_std),
            "samples_per_s": _r(statistics.fmean(r.samples_per_s for r in runs), 2),
            "params": round(statistics.fmean(r.params for r in runs)),
            "flops_per_step": round(statistics.fmean(r.flops_per_step for r in runs)),
            "pareto": False, "runs": " ".join(r.name for r in runs),
        })
    for i in pareto_front([(row["flops_per_step"], row["best_accuracy_pct"]) for row in rows]):
        rows[i]["pareto"] = True
    return rows


# ---- the files ------------------------------------------------------------------------------------

def _pm(mean, std, digits: int = 1) -> str:
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def markdown_table(rows: list) -> str:
    head = ("| fusion layer | decoder layers | pooling | repeats | best acc. (%) | last acc. (%) | steps/s "
            "| samples/s | params | GFLOP/step | Pareto |")
    lines = [head, "|" + "---:|" * 4 + "---:|" * 6 + ":---:|"]
    for r in rows:
        lines.append(
            f"| {r['fuse_layer']} | {'default' if r['decoder_layers'] is None else r['decoder_layers']} | {r['pool']} "
            f"| {r['repeats']} | {_pm(r['best_accuracy_pct'], r['best_accuracy_pct_std'])} "
            f"| {_pm(r['last_accuracy_pct'], r['last_accuracy_pct_std'])} "
            f"| {_pm(r['steps_per_s'], r['steps_per_s_std'], 2)} | {r['samples_per_s']:.0f} | {r['params']:,} "
            f"| {r['flops_per_step'] / 1e9:.3g} | {'★' if r['pareto'] else ''} |")
    return "\n".join(lines)


def _markdown(summary: dict) -> str:
    out = [f"# Sweep summary: {summary['runs_dir']}", "",
           f"{summary['finished']} finished run(s) in {len(summary['points'])} grid point(s); "
           f"{len(summary['failed'])} failed; {len(summary['broken'])} broken.", "",
           "Accuracy: the VQA accuracy on the eval side, best during training and at the last step, "
           "mean ± sample standard deviation over repeats. Steps/s: training steps per second (eval "
           "excluded). GFLOP/step: analytical count of one training step. ★: on the Pareto front of best "
           "accuracy against FLOPs per step.", "", markdown_table(summary["points"]), ""]
    for what in ("failed", "broken"):
        if summary[what]:
            out += [f"## {what.capitalize()} runs (not in the table)", ""]
            out += [f"- `{b['run']}`: {b['reason']}" for b in summary[what]] + [""]
    if summary["figures"]:
        out += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in summary["figures"]] + [""]
    return "\n".join(out)


def _csv(rows: list) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    return buf.getvalue()


def _common(values):
    """The one value all runs share, else None."""
    values = set(values)
    return values.pop() if len(values) == 1 else None


def report(runs_dir, figures: bool = True) -> dict:
    """Rebuild ``summary.{json,csv,md}`` and ``figures/`` of ``runs_dir`` from its run directories.

    Returns:
        The summary (also ``summary.json``): ``points`` (the rows), ``runs`` (one entry per finished
        run), ``failed`` and ``broken`` (``{run, reason}``), ``figures`` (paths relative to runs_dir).

    Raises:
        SweepError: ``runs_dir`` holds no ``runs/`` folder.
    """
    runs_dir = Path(runs_dir).resolve()
    records, failed, broken = scan(runs_dir)
    for b in broken:
        log.warning("broken run %s: %s (left out of the summary)", b["run"], b["reason"])
    for f in failed:
        log.warning("failed run %s: %s (left out of the summary)", f["run"], f["reason"])
    rows = summarise(records)
    written = []
    if figures:
        from .figures import make_figures

        fig_dir = runs_dir / FIGURES
        shutil.rmtree(fig_dir, ignore_errors=True)  # a figure no longer drawn must not linger
        drawn = make_figures(rows, records, fig_dir, encoder_layers=_common(r.encoder_layers for r in records),
                             full_length=_common(r.tokens for r in records))
        written = [str(Path(FIGURES) / p.name) for p in drawn]
    runs = [{k: v for k, v in asdict(r).items() if k not in ("history", "encoder_layers", "tokens")}
            for r in sorted(records, key=lambda r: r.name)]
    summary = {"runs_dir": str(runs_dir), "finished": len(records), "points": rows, "runs": runs,
               "failed": failed, "broken": broken, "figures": written}
    write_atomic(runs_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(runs_dir / "summary.csv", _csv(rows))
    write_atomic(runs_dir / "summary.md", _markdown(summary))
    log.info("summary of %d finished run(s) in %d grid point(s): %s", len(records), len(rows),
             runs_dir / "summary.md")
    return summary
