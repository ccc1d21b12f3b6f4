"""``store``: inspect, verify and maintain an embedding cache from the shell."""

import json
import sys

import click
import numpy as np

from . import ops
from .cache import CacheReader
from .errors import MissingIdError, StoreError


def _fail_on_store_errors(fn):
    """Turn the store's own errors into one clear line on stderr and exit status 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            raise  # the reader of our output left (`store ls cache | head`): click exits 1, quietly
        except (StoreError, OSError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def _checked(path):
    """``path``, once a walk of its index in a child process found no damage: a damaged page can
    crash LMDB (SIGSEGV, SIGBUS), and a shell tool must say so instead of dying (:mod:`store.walk`)."""
    from .env import is_cache
    from .walk import check_index

    if is_cache(path):  # else the reader says what the path is
        check_index(path)
    return path


def _size(n) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def _emit(data, as_json: bool, rows) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.6g}"


@click.group()
@click.version_option(package_name="where-to-fuse")
def cli():
    """Inspect, verify and maintain an LMDB embedding cache (image id -> array).

    Commands that only read open the cache read-only and never change it.

    Example:

        store info cache/   store verify cache/   store get cache/ 42 --npy 42.npy
    """


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_fail_on_store_errors
def info(path, as_json):
    """Metadata, entry count, size on disk and bytes per entry.

    Example:

        store info runs/cache --json
    """
    d = ops.info(_checked(path))
    rows = [("path", d["path"]), ("entries", d["count"]), ("shape", "×".join(map(str, d["shape"]))),
            ("dtype", d["dtype"]), ("bytes per value", d["bytes_per_value"]),
            ("size on disk", _size(d["size_on_disk"])),
            ("bytes per entry", "-" if d["bytes_per_entry"] is None else f"{d['bytes_per_entry']:.0f} "
             f"({d['overhead']:.4f} × payload)"),
            ("schema", d["schema_version"]), ("created", d["created"]), ("updated", d["updated"])]
    rows += [(f"producer.{k}", json.dumps(v) if isinstance(v, (dict, list)) else v)
             for k, v in sorted(d["producer"].items())]
    _emit(d, as_json, rows)


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--limit", type=int, default=None, help="Print at most N ids.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@_fail_on_store_errors
def ls(path, limit, as_json):
    """List the ids in the cache (byte order).

    Example:

        store ls runs/cache --limit 10
    """
    with CacheReader(_checked(path)) as r:
        ids = []
        for i, key in enumerate(r.keys()):
            if limit is not None and i >= limit:
                break
            ids.append(key)
    if as_json:
        click.echo(json.dumps(ids, ensure_ascii=False))
    else:
        for key in ids:
            click.echo(key)


@cli.command()
@click.argument("path", type=click.Path())
@click.argument("image_id")
@click.option("--npy", type=click.Path(dir_okay=False), help="Also save the value to this .npy file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_fail_on_store_errors
def get(path, image_id, npy, as_json):
    """Shape, dtype and statistics of one entry (min/max/mean/std/L2 norm, NaN/inf count).

    Example:

        store get runs/cache 42 --npy 42.npy
    """
    with CacheReader(_checked(path)) as r:
        try:
            value = r[image_id]
        except MissingIdError as e:
            raise click.ClickException(str(e)) from None
        dtype = r.meta.dtype
    d = {"id": image_id, "dtype": dtype, **ops.stats(value)}
    if npy:
        np.save(npy, value, allow_pickle=False)
        d["npy"] = npy
    rows = [("id", image_id), ("shape", "×".join(map(str, d["shape"]))), ("dtype", dtype)]
    rows += [(k, _fmt(d[k])) for k in ("min", "max", "mean", "std", "l2_norm")]
    rows += [("nan", d["nan"]), ("inf", d["inf"])] + ([("saved", npy)] if npy else [])
    _emit(d, as_json, rows)


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_fail_on_store_errors
def verify(path, as_json):
    """Check every entry's checksum, size and NaN/inf; exit 1 listing bad ids if any.

    Example:

        store verify runs/cache || echo "rebuild the bad ids"
    """
    from tqdm import tqdm

    with tqdm(unit="value", disable=as_json or not sys.stderr.isatty(), leave=False) as bar:
        d = ops.verify(path, progress=bar.update, on_total=lambda n: setattr(bar, "total", n))
    if d["checked"] == 0 and not d["bad"]:
        raise click.ClickException(f"{path}: the cache is empty, nothing to verify")
    if as_json:
        click.echo(json.dumps(d, indent=2, ensure_ascii=False))
    else:
        for b in d["bad"]:
            click.echo(f"{b['id']}\t{b['reason']}")
        click.echo(f"checked {d['checked']} entries: {len(d['bad'])} bad", err=bool(d["bad"]))
    if d["bad"]:
        sys.exit(1)


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--ids", "ids_file", required=True, type=click.File("r", encoding="utf-8"),
              help="A file of ids, one per line (first tab-separated field; '-' for stdin).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@_fail_on_store_errors
def missing(path, ids_file, as_json):
    """Print the ids of a file that are absent from the cache.

    Example:

        store missing runs/cache --ids image_ids.txt > todo.txt
    """
    ids = [line.rstrip("\n").split("\t")[0] for line in ids_file if line.strip()]
    with CacheReader(_checked(path)) as r:
        absent = r.missing(ids)
    if as_json:
        click.echo(json.dumps({"checked": len(ids), "missing": absent}, ensure_ascii=False))
    else:
        for i in absent:
            click.echo(i)
        click.echo(f"{len(absent)} of {len(ids)} ids missing", err=True)


@cli.command()
@click.argument("dst", type=click.Path())
@click.argument("srcs", nargs=-1, required=True, type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace ids that DST already holds.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_fail_on_store_errors
def merge(dst, srcs, overwrite, as_json):
    """Merge caches SRC... into DST (created if absent). Sources are checked before anything is written.

    Example:

        store merge runs/cache runs/cache.part0 runs/cache.part1
    """
    for p in (dst, *srcs):
        _checked(p)
    d = ops.merge(dst, srcs, overwrite=overwrite)
    _emit(d, as_json, [("copied", d["copied"]), ("skipped (already in DST)", d["skipped"])])


@cli.command()
@click.argument("path", type=click.Path())
@click.argument("out_pattern")
@click.option("--maxcount", type=int, default=1000, show_default=True, help="Entries per shard.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_fail_on_store_errors
def export(path, out_pattern, maxcount, as_json):
    """Export to WebDataset tar shards (per entry: `id.txt` and the value as `.npy`).

    Example:

        store export runs/cache 'shards/emb-%06d.tar' --maxcount 5000
    """
    d = ops.export(_checked(path), out_pattern, maxcount=maxcount)
    _emit(d, as_json, [("exported", d["count"]), ("shards", len(d["shards"]))] +
          [("", s) for s in d["shards"]])


def main():
    cli(prog_name="store")


if __name__ == "__main__":
    main()
