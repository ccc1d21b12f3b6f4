"""``fuse-sweep``: a training per grid point, then the summary and figures (see :mod:`pipelines.sweep.run`).

``fuse-sweep [run] ...`` runs (``run`` may be left out); ``fuse-sweep report RUNS_DIR`` rebuilds the
summary and figures from the finished runs alone. Every ``fuse-train`` setting that is not the
grid's own (``--fuse``, ``--pool``, ``--decoder-layers``) or a run's own (``--out``, ``--resume``,
...) is taken over from ``fuse-train``'s options, so both commands accept the same flags.
"""

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import click

from ..sweep.plan import GRIDS, SweepConfig
from .common import cli_errors, parse_caches
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
    from ..sweep.report import markdown_table

    if summary["points"]:
        click.echo(markdown_table(summary["points"]))
    for what in ("failed", "broken"):
        for b in summary[what]:
            click.echo(f"{what}: {b['run']}: {b['reason']}")
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
    """Answer "where to fuse": one training per grid point (fusion layer × decoder depth × pooling
    × repeat), then summary tables and figures.

    `fuse-sweep run` may be written `fuse-sweep` (see `fuse-sweep run --help`).

    Example:

    \b
        fuse-sweep --grid cpu --shards runs/qa --cache image=runs/cache --out runs/sweep
        fuse-sweep report runs/sweep
    """


@main.command(context_settings={"show_default": True})
@click.option("--shards", type=click.Path(exists=True, file_okay=False), help="Folder written by `vqa-data shards`.")
@click.option("--vqa", type=click.Path(exists=True, file_okay=False),
              help="A VQA v2 folder instead of --shards: its shards are written to OUT/qa once.")
@click.option("--cache", "caches", multiple=True, metavar="MODALITY=PATH",
              help="An embedding cache per vector modality.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Runs directory: runs/, summary.{csv,json,md}, figures/, sweep.log.")
@click.option("--grid", type=click.Choice(sorted(GRIDS)),
              help="A named grid (cpu: fusion 0,2,4 × decoder 1,2 × 2 seeds, demo preset, 300 steps); "
                   "flags override it.")
@click.option("--modality", help="The vector modality whose fusion layer is swept.  [default: image]")
@click.option("--fuse-layers", callback=_ints, metavar="L,L,...",
              help="Fusion layers of the modality (0 = early, encoder depth = late); the question joins at 0.")
@click.option("--decoder-layers", callback=_ints, metavar="N,N,...", help="Decoder depths.  [default: the model's]")
@click.option("--pool", "pools", callback=_words, metavar="P,P,...",
              help="Poolings: none or TYPE:LENGTH (mean, max, attention), e.g. none,mean:4,attention:4.  "
                   "[default: none]")
@click.option("--repeats", type=int, help="Runs per grid point (seeds --seed, --seed + 1, ...).  [default: 1]")
@click.option("--retry-failed", is_flag=True, default=None,
              help="Redo runs that failed (diverged or raised) in an earlier sweep.")
@click.option("--dry-run", is_flag=True, help="Print the plan (each run: todo, finished, failed, broken) and stop.")
@train_options(skip=_SWEEP_OWNS)
def run(caches, grid, dry_run, **flags):
    """Train every grid point that is not finished yet, then write the summary and figures.

    Finished runs are skipped; a run folder without a whole results.json (a killed run) goes on
    from its last checkpoint if it was started with the same settings, else it is deleted and run
    again; a run whose loss diverges, or that raises any other error, is recorded as failed
    (OUT/runs/RUN/failed.json, with the reason) and the sweep goes on. All fuse-train options below
    --dry-run apply to every run (--seed is the first repeat's seed).

    Example:

    \b
        fuse-sweep --shards runs/qa --cache image=runs/cache --fuse-layers 0,1,2,3,4 --decoder-layers 1,2,4 --preset demo --steps 300 --out runs/sweep
        fuse-sweep --grid cpu --shards runs/qa --cache image=runs/cache --out runs/sweep
    """
    from ..sweep.plan import plan
    from ..sweep.run import run_sweep

    train = {name: flags.pop(name) for name in train_option_names(skip=_SWEEP_OWNS)}
    train["file"] = train.pop("config_file", None)
    if caches:
        flags["caches"] = parse_caches(caches)
    with cli_errors():
        cfg = SweepConfig.resolve(grid or "", train=train, **flags)
        base, todo = plan(cfg)  # every grid point checked before anything is written
    if dry_run:
        for point, status, reason in todo:
            click.echo(f"{point.name}\t{status}" + (f"\t{reason}" if reason else ""))
        click.echo(f"{sum(s != 'finished' and s != 'failed' for _, s, _ in todo)} of {len(todo)} run(s) to do "
                   f"({base.steps} steps each)")
        return
    with _logging_to(cfg.out), cli_errors():
        summary = run_sweep(cfg, planned=(base, todo))
    _echo_summary(summary)
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


if __name__ == "__main__":
    main()
