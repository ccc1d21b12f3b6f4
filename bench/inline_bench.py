"""Inline shards vs the LMDB join, side by side: the training stream's samples/s and bytes on disk.

Builds, in a temporary folder, a cache of real-sized values (196x768 float16, random), QA shards of
synthetic-shapes questions for the same images (5 per image) that join the cache by id, and the
same shards with the values inline (``vqa-data shards --inline``: one raw ``.npy`` per sample).
After a warm-up epoch of each (page cache), times ``--repeats`` interleaved epochs of the training
stream (``train_loader``, ``--workers`` workers, ``--batch-size``) over each and reports the best.

Bytes on disk per sample (a sample: one question, the unit of training): the LMDB join needs the
cache (``data.mdb``) and the shards; inline shards hold both.

Usage:
    python bench/inline_bench.py [--images 1000] [--questions 5] [--batch-size 64] [--workers 2]
"""

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipelines.data.inline import INLINE, manifest_entry  # noqa: E402
from pipelines.data.shards import write_shards  # noqa: E402
from pipelines.data.stream import StreamConfig, train_loader  # noqa: E402
from store import CacheReader  # noqa: E402
from stream_bench import SHAPE, build  # noqa: E402  (the same cache and records as bench/stream_bench.py)


def epoch(config) -> tuple:
    """``(records, seconds)`` of one epoch of the training stream."""
    n, t0 = 0, time.perf_counter()
    for batch in train_loader(config):
        assert batch["vectors"]["image"].shape[1:] == SHAPE
        n += len(batch["id"])
    return n, time.perf_counter() - t0


def size(paths) -> int:
    return sum(os.path.getsize(p) for p in paths)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        shards, n = build(tmp, args.images, args.questions)
        cache = os.path.join(tmp, "cache")
        from pipelines.data.stream import read_records

        with CacheReader(cache) as reader:
            inline = write_shards(read_records(shards), os.path.join(tmp, "inline", "train-%06d.tar"), min_shards=8,
                                  inline={"image": reader})
            entry = manifest_entry({"image": reader})
        common = dict(batch_size=args.batch_size, num_workers=args.workers, shuffle_buffer=2000)
        configs = {"lmdb join": StreamConfig(shards=shards, caches={"image": cache}, **common),
                   "inline": StreamConfig(shards=inline, caches={"image": INLINE}, inline=entry, **common)}
        best = {name: 0.0 for name in configs}
        for name, config in configs.items():
            epoch(config)  # warm-up: page cache, imports
        for _ in range(args.repeats):
            for name, config in configs.items():
                records, seconds = epoch(config)
                assert records == n
                best[name] = max(best[name], records / seconds)
        disk = {"lmdb join": size(glob.glob(os.path.join(cache, "*.mdb"))) + size(shards), "inline": size(inline)}
        payload = int(np.prod(SHAPE)) * 2
        print(f"{args.images} images x {args.questions} questions = {n} samples; values {SHAPE[0]}x{SHAPE[1]} "
              f"float16 ({payload:,} B); batch {args.batch_size}, {args.workers} workers, {os.cpu_count()} CPUs; "
              f"best of {args.repeats} epochs")
        for name in configs:
            print(f"{name:10s} {best[name]:9,.0f} samples/s  {disk[name] / n:11,.0f} bytes on disk per sample "
                  f"({disk[name] / 1e6:,.0f} MB)")


if __name__ == "__main__":
    main()
