"""The summary of a sweep, rebuilt from its run directories alone (``fuse-sweep report``).

Every run directory under ``RUNS_DIR/runs/`` is read and classified:

- *finished*: ``results.json`` is whole and has what the summary needs;
- *failed*: ``failed.json`` (the training diverged or raised; kept, not retried by default);
- *broken*: no ``results.json`` (killed, or still running), one that cannot be read, or one marked
  ``stopped`` (``--stop-at``).

Finished runs are grouped by grid point (fusion spec, decoder layers, pooling) — read from each
run's saved config, not from its folder name — and averaged over repeats (mean and sample standard
deviation). A vector modality is one with a cache in the run's config; a run that goes without one
of the vector modalities the other runs fuse is an ablation (``--ablate``), set beside its full grid
point in the ablation rows. Broken and failed runs are listed, never averaged in. The summary goes
to ``summary.json`` / ``summary.csv`` / ``summary.md`` and the figures to ``figures/``
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
from .grid import (
    FAILED,
    FIGURES,
    RESULTS,
    RUNS,
    pool_label,
    pool_sort_key,
    spec_without,
    swept_modalities,
)
from .tables import summary_markdown

log = logging.getLogger(__name__)

# Columns of summary.csv, in order (also keys of summary.json's "points", which add "layers" and
# "pools"); with several swept modalities, a "layer_<modality>" column each follows "fuse".
COLUMNS = ("fuse", "fuse_layer", "ablated", "decoder_layers", "pool", "pool_type", "pool_length", "repeats",
           "best_accuracy_pct", "best_accuracy_pct_std", "last_accuracy_pct", "last_accuracy_pct_std",
           "steps_per_s", "steps_per_s_std", "samples_per_s", "params", "flops_per_step", "pareto", "runs")


class BrokenRun(Exception):
    """A run directory whose results cannot be used; ``str()`` is the reason."""


@dataclass
class RunRecord:
    """What the summary needs of one finished run (accuracies as fractions)."""

    name: str
    fuse_layer: int | None  # the first vector modality's layer (None: the run fuses none)
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
    tokens: int | None = None  # the first vector modality's tokens before pooling, when known
    fuse: str = ""  # the fusion spec, canonical (``0:question,image 4:audio``)
    layers: dict = field(default_factory=dict)  # every fused modality -> its join layer
    pools: dict = field(default_factory=dict)  # every fused vector modality -> "TYPE[:LENGTH]"
    ablated: str = ""  # the sweep's vector modalities this run goes without (:func:`mark_ablations`)
    metric: str = "vqa"  # what ``accuracy`` is (``results.json``'s metric; pipelines.data.example.METRICS)

    def key(self) -> tuple:
        return (self.fuse or self.fuse_layer, self.decoder_layers, self.pool)


def vector_modalities(config: dict, spec: FusionSpec) -> list:
    """The fused modalities with a cache in the run's config, in join order."""
    caches = config.get("caches") or {}
    return [n for n in spec.modalities() if n in caches]


def mark_ablations(records: list) -> None:
    """Set each record's ``ablated``: the vector modalities that other runs fuse and it does not."""
    vectors = list(dict.fromkeys(m for r in records for m in r.pools))
    for r in records:
        r.ablated = ",".join(m for m in vectors if m not in r.pools)


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
        spec = FusionSpec.coerce(config["fuse"])
        vectors = vector_modalities(config, spec)
        pooling = coerce_pools(config.get("pool") or None)
        # in the order of --cache (the plan's), not of joining: one pooling, one label, whatever joins first
        pools = {m: str(pooling.get(m, "none")) for m in sorted(vectors, key=list(config.get("caches") or {}).index)}
    except (FusionConfigError, KeyError, TypeError, AttributeError) as e:
        raise BrokenRun(f"{RESULTS}: config is not a fusion config ({e})") from None
    modality = vectors[0] if vectors else None
    best, last = _eval_entry(results, "best"), _eval_entry(results, "last")
    history = results.get("history")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise BrokenRun(f"{RESULTS}: 'history' is not a list of evaluations")
    encoder_layers, tokens = _architecture(Path(run_dir), config, modality)
    return RunRecord(
        name=Path(run_dir).name, fuse_layer=spec.layer_of(modality) if modality else None,
        decoder_layers=config.get("decoder_layers"), pool=pool_label(pools),
        seed=config.get("seed", 0), best_accuracy=best["accuracy"], best_step=best["step"],
        last_accuracy=last["accuracy"], last_step=last["step"],
        steps_per_s=_number(results.get("steps_per_s"), "steps_per_s", positive=True),
        samples_per_s=_number(results.get("samples_per_s"), "samples_per_s", positive=True),
        params=int(_number(results.get("params"), "params", positive=True)),
        flops_per_step=_number(results.get("flops_per_step"), "flops_per_step", positive=True),
        history=[(h["step"], _number(h.get("accuracy"), "history accuracy")) for h in history],
        encoder_layers=encoder_layers, tokens=tokens, fuse=str(spec),
        layers={m: spec.layer_of(m) for m in spec.modalities()}, pools=pools,
        metric=str(results.get("metric", "vqa")),
    )


def _architecture(run_dir: Path, config: dict, modality: str | None) -> tuple:
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


def sweep_runs(runs_dir) -> list:
    """The names of a sweep's runs: those ``sweep.json`` plans, then any other run folder.

    Raises:
        SweepError: neither a ``sweep.json`` nor a ``runs/`` folder.
    """
    runs_dir = Path(runs_dir)
    try:
        planned = json.loads((runs_dir / "sweep.json").read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        planned = []
    folder = runs_dir / RUNS
    found = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not planned and not found:
        raise SweepError(f"{runs_dir}: no sweep.json and no {RUNS}/ folder (not a sweep directory, or no run "
                         "started yet)")
    return [*planned, *(n for n in found if n not in planned)]


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


def _n(x) -> int:
    return -1 if x is None else x


def summarise(records: list) -> list:
    """One row (a dict of :data:`COLUMNS`, ``layers`` and ``pools``) per grid point, sorted: the sweep's
    own points by the swept modalities' layers, fusion layer, decoder, pool; then the ablations."""
    mark_ablations(records)
    groups = {}
    for r in records:
        groups.setdefault(r.key(), []).append(r)
    rows = []
    for key, group in groups.items():
        runs = sorted(group, key=lambda r: (r.seed, r.name))
        best, best_std = _mean_std([100 * r.best_accuracy for r in runs])
        last, last_std = _mean_std([100 * r.last_accuracy for r in runs])
        speed, speed_std = _mean_std([r.steps_per_s for r in runs])
        first, pool = runs[0], key[2]
        kind, _, length = pool.partition(":")
        alike = " " not in pool  # one pooling for every vector modality
        rows.append({
            "fuse": first.fuse, "fuse_layer": first.fuse_layer, "ablated": first.ablated,
            "decoder_layers": key[1], "pool": pool, "pool_type": kind if alike else "per-modality",
            "pool_length": int(length) if alike and length else None, "repeats": len(runs),
            "best_accuracy_pct": _r(best), "best_accuracy_pct_std": _r(best_std),
            "last_accuracy_pct": _r(last), "last_accuracy_pct_std": _r(last_std),
            "steps_per_s": _r(speed), "steps_per_s_std": _r(speed_std),
            "samples_per_s": _r(statistics.fmean(r.samples_per_s for r in runs), 2),
            "params": round(statistics.fmean(r.params for r in runs)),
            "flops_per_step": round(statistics.fmean(r.flops_per_step for r in runs)),
            "pareto": False, "runs": " ".join(r.name for r in runs),
            "layers": dict(first.layers), "pools": dict(first.pools),
        })
    swept = swept_modalities(rows)
    if swept:  # the fusion layer the figures plot: the (first) swept modality's
        for row in rows:
            row["fuse_layer"] = row["layers"].get(swept[0])
    rows.sort(key=lambda row: (row["ablated"] != "", row["ablated"], tuple(_n(row["layers"].get(m)) for m in swept),
                               _n(row["fuse_layer"]), row["fuse"], _n(row["decoder_layers"]),
                               pool_sort_key(row["pool"])))
    own = [i for i, row in enumerate(rows) if not row["ablated"]]  # an ablation is no answer to "where"
    for i in pareto_front([(rows[i]["flops_per_step"], rows[i]["best_accuracy_pct"]) for i in own]):
        rows[own[i]]["pareto"] = True
    return rows


def ablation_rows(rows: list) -> list:
    """For each grid point trained also without some of its vector modalities (``--ablate``): one row per
    modality removed, the accuracy without it beside the point's own (``drop``: how much it costs)."""
    ablated = {(r["fuse"], r["decoder_layers"], r["pool"]): r for r in rows if r["ablated"]}
    vectors = list(dict.fromkeys(m for r in rows for m in r["pools"]))  # one order for every point
    out = []
    for full in (r for r in rows if not r["ablated"]):
        for m in (v for v in vectors if v in full["pools"]):
            kept = spec_without(FusionSpec.coerce(full["fuse"]), m)
            pool = pool_label({k: v for k, v in full["pools"].items() if k != m})
            a = ablated.get((str(kept), full["decoder_layers"], pool)) if kept else None
            if a is None:
                continue
            out.append({
                "fuse": full["fuse"], "decoder_layers": full["decoder_layers"], "pool": full["pool"],
                "removed": m, "fuse_without": a["fuse"], "repeats": a["repeats"],
                **{f"{w}_accuracy_pct{s}": a[f"{w}_accuracy_pct{s}"] for w in ("best", "last") for s in ("", "_std")},
                **{f"full_{w}_accuracy_pct{s}": full[f"{w}_accuracy_pct{s}"] for w in ("best", "last")
                   for s in ("", "_std")},
                "best_drop_pct": _r(full["best_accuracy_pct"] - a["best_accuracy_pct"]),
                "runs": a["runs"], "full_runs": full["runs"],
            })
    return out


# ---- the files ------------------------------------------------------------------------------------

def _csv(rows: list) -> str:
    swept = swept_modalities(rows)
    layers = [f"layer_{m}" for m in swept] if len(swept) > 1 else []
    columns = COLUMNS[:1] + tuple(layers) + COLUMNS[1:]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = {**row, **{f"layer_{m}": row["layers"].get(m) for m in swept}}
        writer.writerow({k: "" if values[k] is None else values[k] for k in columns})
    return buf.getvalue()


def _common(values):
    """The one value all runs share, else None."""
    values = set(values)
    return values.pop() if len(values) == 1 else None


def report(runs_dir, figures: bool = True) -> dict:
    """Rebuild ``summary.{json,csv,md}`` and ``figures/`` of ``runs_dir`` from its run directories.

    Returns:
        The summary (also ``summary.json``): ``points`` (the rows), ``swept`` (the modalities whose
        layer varies), ``ablation`` (:func:`ablation_rows`), ``runs`` (one entry per finished run),
        ``failed`` and ``broken`` (``{run, reason}``), ``running`` (``{run, status, job}``: queued or
        running jobs, :mod:`pipelines.sweep.jobs`), ``figures`` (paths relative to runs_dir).

    Raises:
        SweepError: ``runs_dir`` holds no ``runs/`` folder.
    """
    from .jobs import point_states

    runs_dir = Path(runs_dir).resolve()
    records, failed, broken = scan(runs_dir)
    states = {r["run"]: r for r in point_states(runs_dir, [b["run"] for b in broken])}
    running = [{"run": b["run"], "status": states[b["run"]]["status"], "job": states[b["run"]]["job"]}
               for b in broken if states[b["run"]]["status"] in ("queued", "running")]
    broken = [b for b in broken if b["run"] not in {r["run"] for r in running}]
    for r in running:
        log.info("run %s: %s (job %s): left out of the summary until it finishes", r["run"], r["status"], r["job"])
    for b in broken:
        log.warning("broken run %s: %s (left out of the summary)", b["run"], b["reason"])
    for f in failed:
        log.warning("failed run %s: %s (left out of the summary)", f["run"], f["reason"])
    rows = summarise(records)
    ablation = ablation_rows(rows)
    written = []
    if figures:
        from .figures import make_figures

        fig_dir = runs_dir / FIGURES
        shutil.rmtree(fig_dir, ignore_errors=True)  # a figure no longer drawn must not linger
        drawn = make_figures(rows, records, fig_dir, encoder_layers=_common(r.encoder_layers for r in records),
                             full_length=_common(r.tokens for r in records), ablation=ablation,
                             metric=_common(r.metric for r in records) or "vqa")
        written = [str(Path(FIGURES) / p.name) for p in drawn]
    runs = [{k: v for k, v in asdict(r).items() if k not in ("history", "encoder_layers", "tokens")}
            for r in sorted(records, key=lambda r: r.name)]
    summary = {"runs_dir": str(runs_dir), "finished": len(records), "metric": _common(r.metric for r in records),
               "points": rows,
               "swept": swept_modalities(rows), "ablation": ablation, "runs": runs,
               "failed": failed, "broken": broken, "running": running, "figures": written}
    write_atomic(runs_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(runs_dir / "summary.csv", _csv(rows))
    write_atomic(runs_dir / "summary.md", summary_markdown(summary))
    log.info("summary of %d finished run(s) in %d grid point(s): %s", len(records), len(rows),
             runs_dir / "summary.md")
    return summary
