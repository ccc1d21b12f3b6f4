"""``fuse-sweep``: a training per grid point, then the summary and figures (see :mod:`pipelines.sweep.run`).

``fuse-sweep [run] ...`` runs (``run`` may be left out; ``--executor local|slurm`` as submitit jobs:
:mod:`pipelines.sweep.jobs`); ``fuse-sweep report RUNS_DIR`` rebuilds the summary and figures from the
finished runs alone; ``fuse-sweep status RUNS_DIR`` shows each point's state and job. Every ``fuse-train`` setting that is not the
grid's own (``--fuse``, ``--pool``, ``--decoder-layers``) or a run's own (``--out``, ``--resume``,
...) is taken over from ``fuse-train``'s options, so both commands accept the same flags.
"""

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import click

from ..sweep.jobs import ExecutorConfig
from ..sweep.plan import GRIDS, SweepConfig
from .common import cli_errors, parse_caches, parse_pairs
from .options import train_option_names, train_options

# fuse-train options the sweep sets itself for every run.
_SWEEP_OWNS = ("shards", "caches", "out", "fuse", "pool", "decoder_layers", "resume", "overwrite", "stop_at")


def _ints(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value}: expected comma-separated integers, e.g. 0,2,4") from None


def _words(ctx, param, value):
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


@contextmanager
def _logging_to(runs_dir):
    """Log to stderr and to RUNS_DIR/sweep.log (appended) while the command runs."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(runs_dir) / "sweep.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _echo_summary(summary: dict) -> None:
    from ..sweep.tables import ablation_table, markdown_table

    if summary["points"]:
        click.echo(markdown_table(summary["points"]))
    if summary["ablation"]:
        click.echo("\nAblation:\n" + ablation_table(summary["ablation"]))
    for what in ("failed", "broken"):
        for b in summary[what]:
            click.echo(f"{what}: {b['run']}: {b['reason']}")
    for r in summary.get("running", []):
        click.echo(f"{r['status']}: {r['run']} (job {r['job']}): not in the summary until it finishes")
    d = Path(summary["runs_dir"])
    click.echo(f"{summary['finished']} finished run(s); summary: {d / 'summary.md'} (.csv, .json); "
               f"{len(summary['figures'])} figure(s) in {d / 'figures'}")


class SweepGroup(click.Group):
    """A group whose ``run`` command is the default: ``fuse-sweep --shards ...`` is ``fuse-sweep run ...``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=SweepGroup)
def main():
    """Answer "where to fuse": one training per grid point (the swept modalities' fusion layers ×
    decoder depth × pooling × repeat; with --ablate, each point also without each vector modality),
    then summary tables and figures.

    `fuse-sweep run` may be written `fuse-sweep` (see `fuse-sweep run --help`).

    Example:

    \b
        fuse-sweep --grid cpu --shards runs/qa --cache image=runs/cache --out runs/sweep
        fuse-sweep --shards runs/qa --cache image=runs/cache --cache audio=runs/audio --fuse-grid "image=0,4 audio=0,2,4" --ablate --preset demo --out runs/sweep-av
        fuse-sweep report runs/sweep
        fuse-sweep --grid cpu --shards runs/qa --cache image=runs/cache --out runs/sweep --executor local --parallel 2
        fuse-sweep --shards /shared/qa --cache image=inline --fuse-layers 0,6,12 --preset paper --out /shared/sweep --executor slurm --partition gpu --time 720
        fuse-sweep status /shared/sweep
    """


@main.command(context_settings={"show_default": True})
@click.option("--shards", type=click.Path(exists=True, file_okay=False), help="Folder written by `vqa-data shards`.")
@click.option("--vqa", type=click.Path(exists=True, file_okay=False),
              help="A VQA v2 folder instead of --shards: its shards are written to OUT/qa once.")
@click.option("--split-by", type=click.Choice(["image", "question"]),
              help="With --vqa: split 80/20 by image (no image on both sides) or by question (a random 80% of "
                   "the questions, as the thesis did).  [default: image]")
@click.option("--cache", "caches", multiple=True, metavar="MODALITY=PATH",
              help="An embedding cache per vector modality (a modality without one is a text field).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Runs directory: runs/, summary.{csv,json,md}, figures/, sweep.log.")
@click.option("--grid", type=click.Choice(sorted(GRIDS)),
              help="A named grid (cpu: fusion 0,2,4 × decoder 1,2 × 2 seeds, demo preset, 300 steps); "
                   "flags override it.")
@click.option("--fuse", metavar="SPEC",
              help="The fixed part of every run's fusion spec, in fuse-train's --fuse syntax; \"\" for none.  "
                   "[default: 0:question]")
@click.option("--fuse-grid", metavar="\"MOD=L,L MOD=L,L\"",
              help="The swept modalities' fusion layers (0 = early, encoder depth = late), on top of --fuse: "
                   "every combination is a grid point, e.g. \"image=0,4 audio=0,2,4\" (6 points). A modality "
                   "may not be in both.")
@click.option("--modality", help="With --fuse-layers: the modality swept (--fuse-layers L,L is --fuse-grid "
                                 "MODALITY=L,L).  [default: image]")
@click.option("--fuse-layers", callback=_ints, metavar="L,L,...",
              help="Fusion layers of --modality: a one-modality --fuse-grid (runs named f3-d2-...).")
@click.option("--decoder-layers", callback=_ints, metavar="N,N,...", help="Decoder depths.  [default: the model's]")
@click.option("--pool", "pools", callback=_words, metavar="P,P,...",
              help="Poolings of the vector modalities. TYPE[:LENGTH] items (none, mean:4, max:4, attention:4) "
                   "pool every vector modality alike, one grid value each: none,attention:4. MOD:TYPE[:LENGTH] "
                   "items pool one modality each; the grid takes every combination, a modality not named is "
                   "not pooled: image:none,image:attention:4,audio:mean:2 (2 values). Not both kinds.  "
                   "[default: none]")
@click.option("--ablate", is_flag=True, default=None,
              help="Also train each grid point without each vector modality in turn (runs named no_MOD; "
                   "one run per distinct spec); summary and figures set them beside the point.")
@click.option("--repeats", type=int, help="Runs per grid point (seeds --seed, --seed + 1, ...).  [default: 1]")
@click.option("--retry-failed", is_flag=True, default=None,
              help="Redo runs that failed (diverged or raised) in an earlier sweep.")
@click.option("--dry-run", is_flag=True, help="Print the plan (each run: todo, finished, failed, broken) and stop.")
@click.option("--executor", type=click.Choice(["serial", "local", "slurm"]), default="serial",
              help="serial: the points one after another in this process; local: submitit jobs on this machine, "
                   "--parallel at once or one per --gpus id; slurm: one Slurm job per point (returns once "
                   "submitted: follow them with `fuse-sweep status`).")
@click.option("--parallel", type=int, default=1, help="With --executor local: points at once (CPU).")
@click.option("--gpus", callback=_ints, metavar="ID,ID,...",
              help="With --executor local: one point per GPU at once, e.g. 0,1,2,3.")
@click.option("--partition", default="", help="With --executor slurm: the partition.")
@click.option("--gpus-per-run", type=int, default=1, help="With --executor slurm: GPUs per point's job.")
@click.option("--time", "time_min", type=int, default=24 * 60, help="With --executor slurm: minutes per job "
              "(a job timed out or preempted is requeued and goes on from its last checkpoint).")
@click.option("--slurm-opt", "slurm_opts", multiple=True, metavar="KEY=VALUE",
              help="With --executor slurm: any sbatch option, e.g. account=abc, constraint=a100, mem=64G.")
@train_options(skip=_SWEEP_OWNS)
def run(caches, grid, dry_run, executor, parallel, gpus, partition, gpus_per_run, time_min, slurm_opts, **flags):
    """Train every grid point that is not finished yet, then write the summary and figures.

    A run fuses --fuse (default: the question at layer 0) plus each --fuse-grid modality at its
    grid layer; every run is checked against the model and the caches before any training.

    Finished runs are skipped; a run folder without a whole results.json (a killed run) goes on
    from its last checkpoint if it was started with the same settings, else it is deleted and run
    again; a run whose loss diverges, or that raises any other error, is recorded as failed
    (OUT/runs/RUN/failed.json, with the reason) and the sweep goes on. All fuse-train options below
    --slurm-opt apply to every run (--seed is the first repeat's seed).

    --executor local runs the points as submitit jobs on this machine (--parallel N at once, or one
    per GPU of --gpus) and waits; --executor slurm submits one Slurm job per point and returns
    (follow them with `fuse-sweep status OUT` and `fuse-sweep report OUT`; the same command again
    submits what is neither finished nor queued nor running). A job killed, timed out or preempted
    goes on from its run's last checkpoint when it runs again.

    Example:

    \b
        fuse-sweep --shards runs/qa --cache image=runs/cache --fuse-layers 0,1,2,3,4 --decoder-layers 1,2,4 --preset demo --steps 300 --out runs/sweep
        fuse-sweep --grid cpu --shards runs/qa --cache image=runs/cache --out runs/sweep
        fuse-sweep --shards runs/qa --cache image=runs/cache --cache audio=runs/audio --fuse "0:question 4:image" --fuse-grid audio=0,2,4 --ablate --pool image:attention:4,audio:none,audio:mean:2 --preset demo --out runs/sweep-audio
        fuse-sweep --shards /shared/qa --cache image=inline --fuse-layers 0,6,12 --preset paper --out /shared/sweep --executor slurm --partition gpu --gpus-per-run 1 --time 720 --slurm-opt account=abc
    """
    from ..sweep.plan import plan
    from ..sweep.run import run_sweep

    train = {name: flags.pop(name) for name in train_option_names(skip=_SWEEP_OWNS)}
    train["file"] = train.pop("config_file", None)
    if caches:
        flags["caches"] = parse_caches(caches)
    opts = parse_pairs(slurm_opts, "--slurm-opt", "account=abc", form="KEY=VALUE")
    with cli_errors():
        flags["executor"] = ExecutorConfig(executor, parallel, gpus or (), partition, gpus_per_run, time_min, opts)
        cfg = SweepConfig.resolve(grid or "", train=train, **flags)
        base, todo = plan(cfg)  # every grid point checked before anything is written
    if dry_run:
        for point, status, reason in todo:
            click.echo(f"{point.name}\t{status}\t--fuse '{cfg.run_config(base, point).fuse}'"
                       + (f"\t{reason}" if reason else ""))
        for note in cfg.skipped_ablations():
            click.echo(note)
        click.echo(f"{sum(s != 'finished' and s != 'failed' for _, s, _ in todo)} of {len(todo)} run(s) to do "
                   f"({base.steps} steps each)")
        return
    with _logging_to(cfg.out), cli_errors():
        summary = run_sweep(cfg, planned=(base, todo))
    if summary["in_flight"]:
        click.echo(f"{len(summary['in_flight'])} run(s) already queued or running: {', '.join(summary['in_flight'])}")
    if cfg.executor.kind == "slurm":
        click.echo(f"submitted {len(summary['submitted'])} Slurm job(s): "
                   + ", ".join(f"{n} {j}" for n, j in summary["submitted"].items())
                   + f"\nfollow them with: fuse-sweep status {cfg.out}; fuse-sweep report {cfg.out}")
        return
    _echo_summary(summary)
    unfinished = [n for n in summary["submitted"] if n not in summary["ran"] and n not in summary["newly_failed"]]
    if unfinished:
        raise click.ClickException(f"{len(unfinished)} job(s) ended before their run finished: {', '.join(unfinished)} "
                                   "(killed?): run the same command again to resume them")
    if summary["newly_failed"]:
        raise click.ClickException(f"{len(summary['newly_failed'])} run(s) failed: "
                                   f"{', '.join(summary['newly_failed'])} (see {cfg.out}/summary.md)")


@main.command()
@click.argument("runs_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print summary.json instead of the table.")
def report(runs_dir, as_json):
    """Rebuild summary.{csv,json,md} and figures/ of RUNS_DIR from its finished runs alone.

    Broken runs (no whole results.json) and failed runs are listed, not averaged in.

    Example:

    \b
        fuse-sweep report runs/sweep
    """
    from ..sweep.report import report as build

    with _logging_to(runs_dir), cli_errors():
        summary = build(runs_dir)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _echo_summary(summary)


@main.command()
@click.argument("runs_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(runs_dir, as_json):
    """Show each grid point of RUNS_DIR: finished, failed, running or queued (with its job id), broken
    (a run folder and no live job: rerun the sweep to resume it) or todo.

    Example:

    \b
        fuse-sweep status runs/sweep
    """
    from ..sweep.jobs import point_states
    from ..sweep.report import sweep_runs

    with cli_errors():
        rows = point_states(runs_dir, sweep_runs(runs_dir))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max([len(r["run"]) for r in rows] + [3])
    for r in rows:
        click.echo(f"{r['run']:<{width}}  {r['status']:<8}  {r['job'] or '-':<10}  {r['reason']}".rstrip())
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    click.echo(", ".join(f"{n} {s}" for s, n in counts.items()))


@main.command(hidden=True)
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
def point(out, name):
    """Train one grid point of the sweep in OUT (what a submitted job runs: see pipelines.sweep.jobs)."""
    from ..sweep.jobs import run_point

    with _logging_to(out), cli_errors():
        run_point(out, name)


if __name__ == "__main__":
    main()
