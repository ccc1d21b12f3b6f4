"""Training stream vs bare cache reads, side by side, in samples/s.

Builds, in a temporary folder, a cache of real-sized values (196x768 float16, random) and QA shards
of synthetic-shapes questions for the same images (5 per image), then, after a warm-up epoch that
brings everything into the page cache, times ``--repeats`` interleaved rounds (so that other load
on the machine hits every row alike) of, and reports the best round of each:

- bare cache reads: ``reader[id]`` in one process, for the very ids the stream yielded, in its order:
  one lookup and one copy of each value out of the map into its own numpy array;
- the same with LMDB alone: ``txn.get`` (bytes: the copy) + ``np.frombuffer``, the reference of
  ``bench/store_bench.py``; the stream is compared with the faster of the two;
- batch assembly only: the stream's copy of those values into (B, 196, 768) batches, one process;
- the stream without cache values: shards, shuffle, JSON decode, tokenize, collate, 2 workers;
- the training stream: all of it, the values attached in the loading process (2 workers).

Target: the training stream at >= 0.8 of the bare reads.

Usage:
    python bench/stream_bench.py [--images 2000] [--questions 5] [--batch-size 64] [--workers 2]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipelines.shapes import make_image  # noqa: E402
from pipelines.shards import write_shards  # noqa: E402
from pipelines.stream import StreamConfig, train_loader  # noqa: E402
from pipelines.batch import AttachVectors  # noqa: E402
from store import CacheReader, CacheWriter  # noqa: E402

SHAPE = (196, 768)


def build(tmp, images, questions):
    records = []
    rng = np.random.default_rng(0)
    with CacheWriter(os.path.join(tmp, "cache"), shape=SHAPE, dtype="float16",
                     producer={"model": "random"}) as w:
        for index in range(images):
            _, image_id, qas = make_image(0, index, questions)
            w.put(str(image_id), rng.standard_normal(SHAPE, dtype=np.float32))
            for qa in qas:
                records.append({**qa, "image_id": str(image_id), "split": "train"})
    shards = write_shards(records, os.path.join(tmp, "qa", "train-%06d.tar"), min_shards=8)
    return shards, len(records)


def run_stream(loader):
    """``(ids in stream order, seconds from start, seconds from the first batch on, records)``."""
    ids, t0, t1, first = [], time.perf_counter(), None, 0
    for batch in loader:
        if t1 is None:
            t1, first = time.perf_counter(), len(batch["image_id"])
        ids += batch["image_id"]
    t2 = time.perf_counter()
    return ids, t2 - t0, t2 - t1, len(ids) - first


def run_bare(cache, ids):
    r = CacheReader(cache)
    t0 = time.perf_counter()
    for i in ids:
        r[i]
    return time.perf_counter() - t0


def run_lmdb(cache, ids):
    import lmdb

    from store.format import DB_EMBEDDINGS

    env = lmdb.open(cache, readonly=True, lock=False, max_dbs=4, readahead=False)
    try:
        db = env.open_db(DB_EMBEDDINGS, create=False)
        keys = [i.encode() for i in ids]
        with env.begin(db=db) as txn:
            t0 = time.perf_counter()
            for k in keys:
                np.frombuffer(txn.get(k), dtype=np.float16).reshape(SHAPE)
            return time.perf_counter() - t0
    finally:
        env.close()


def run_assembly(cache, ids, batch_size):
    attach = AttachVectors({"image": CacheReader(cache)})
    t0 = time.perf_counter()
    for k in range(0, len(ids), batch_size):
        attach.values("image", ids[k:k + batch_size])
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of each is reported")
    args = p.parse_args()
    mb = float(np.prod(SHAPE)) * 2 / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shards, n = build(tmp, args.images, args.questions)
        cache = os.path.join(tmp, "cache")
        print(f"built {args.images} cache entries of {SHAPE} float16 and {n} records "
              f"({args.questions} per image) in {len(shards)} shards in {time.perf_counter() - t0:.1f}s; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other processes skew the rates)")
        config = StreamConfig(shards=shards, caches={"image": cache}, batch_size=args.batch_size,
                              num_workers=args.workers, shuffle_buffer=1000)
        ids = run_stream(train_loader(config))[0]  # warm-up: page cache, imports
        assert len(ids) == n, (len(ids), n)
        names = ["bare cache reads, stream's ids (1 process)", "  same, LMDB txn.get + np.frombuffer",
                 f"batch assembly only (cache -> (B, {SHAPE[0]}, {SHAPE[1]}))",
                 f"stream without cache values ({args.workers} workers)",
                 f"training stream ({args.workers} workers, batch {args.batch_size})",
                 "  same, epoch time incl. starting workers"]
        rates = {name: [] for name in names}
        for _ in range(args.repeats):
            rates[names[0]].append(n / run_bare(cache, ids))
            rates[names[1]].append(n / run_lmdb(cache, ids))
            rates[names[2]].append(n / run_assembly(cache, ids, args.batch_size))
            _, _, t, k = run_stream(train_loader(config).loader)
            rates[names[3]].append(k / t)
            _, epoch, t, k = run_stream(train_loader(config))
            rates[names[4]].append(k / t)
            rates[names[5]].append(n / epoch)
    bare = max(max(rates[names[0]]), max(rates[names[1]]))
    print(f"{'':52}{'samples/s':>10}{'MB/s':>8}{'x bare':>8}   all rounds")
    for name in names:
        rate = max(rates[name])
        print(f"{name:52}{rate:10,.0f}{rate * mb:8,.0f}{rate / bare:8.2f}   "
              + " ".join(f"{r:,.0f}" for r in rates[name]))
    ratio = max(rates[names[4]]) / bare
    verdict = "met" if ratio >= 0.8 else "NOT met"
    print(f"training stream / bare reads = {ratio:.2f} (target >= 0.80: {verdict}); steady-state rates "
          f"exclude the first batch; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
