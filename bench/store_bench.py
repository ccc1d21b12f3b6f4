"""Cache throughput on ViT-B/16-sized values (196×768 float16), side by side in one run.

Prints: write throughput of CacheWriter vs writing the same bytes to a plain file (both synced at
the same batch boundaries), random-read values/s of CacheReader vs a bare ``txn.get`` +
``np.frombuffer`` loop over the same ids (ids read before, whose checksum the reader checked on
their first read; the first read itself, with that CRC-32 check; and with the check turned off),
and bytes on disk per entry vs the payload.

    python bench/store_bench.py [--n 1000] [--rounds 5] [--dir /tmp]
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import lmdb
import numpy as np

from store import CacheReader, CacheWriter
from store.format import DB_EMBEDDINGS
from store.ops import disk_bytes

SHAPE = (196, 768)


def write_cache(path, values, batch):
    t = time.perf_counter()
    with CacheWriter(path, shape=SHAPE, batch_size=batch) as w:
        for i in range(0, len(values), batch):
            w.put_batch([str(k) for k in range(i, i + len(values[i:i + batch]))], values[i:i + batch])
    return time.perf_counter() - t


def write_plain(path, values, batch):
    t = time.perf_counter()
    with open(path, "wb") as f:
        for i in range(0, len(values), batch):
            for v in values[i:i + batch]:
                f.write(v.tobytes())
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t


def read_reader(path, ids, verify=True, again=False):
    """Random reads through a CacheReader: each id's first read checks its CRC-32 (``verify``);
    ``again``: time a second pass, whose reads are checked already."""
    with CacheReader(path, verify=verify) as r:
        r[ids[0]]
        if again:
            for i in ids:
                r[i]
        t = time.perf_counter()
        s = 0.0
        for i in ids:
            s += float(r[i][0, 0])
        return time.perf_counter() - t


def read_bare(path, ids):
    env = lmdb.open(str(path), readonly=True, max_dbs=4, readahead=False)
    db = env.open_db(DB_EMBEDDINGS, create=False)
    keys = [i.encode() for i in ids]
    with env.begin(db=db) as txn:
        t = time.perf_counter()
        s = 0.0
        for k in keys:
            s += float(np.frombuffer(txn.get(k), dtype=np.float16).reshape(SHAPE)[0, 0])
        dt = time.perf_counter() - t
    env.close()
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="values to write and read")
    ap.add_argument("--batch", type=int, default=256, help="values per transaction / per fsync")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each measurement")
    ap.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    values = rng.standard_normal((args.n, *SHAPE), dtype=np.float32).astype(np.float16)
    payload = values[0].nbytes
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        w_cache, w_plain = [], []
        for r in range(args.rounds):  # interleaved, order alternating, files removed after each round
            plain, cache = os.path.join(tmp, "plain.bin"), os.path.join(tmp, "cache")
            if r % 2:
                w_cache.append(write_cache(cache, values, args.batch))
                w_plain.append(write_plain(plain, values, args.batch))
            else:
                w_plain.append(write_plain(plain, values, args.batch))
                w_cache.append(write_cache(cache, values, args.batch))
            os.remove(plain)
            shutil.rmtree(cache)
        path = os.path.join(tmp, "cache")
        write_cache(path, values, args.batch)
        ids = [str(i) for i in rng.permutation(args.n)]
        r_reader, r_bare, r_first, r_nocheck = [], [], [], []
        for _ in range(args.rounds):
            r_bare.append(read_bare(path, ids))
            r_reader.append(read_reader(path, ids, again=True))
            r_first.append(read_reader(path, ids))
            r_nocheck.append(read_reader(path, ids, verify=False))
        size = disk_bytes(path)

    mb = args.n * payload / 1e6
    wc, wp = statistics.median(w_cache), statistics.median(w_plain)
    rr, rb = statistics.median(r_reader), statistics.median(r_bare)
    rf, rn = statistics.median(r_first), statistics.median(r_nocheck)
    print(f"values: {args.n} × {SHAPE} float16 = {payload:,} bytes each; median of {args.rounds} interleaved rounds")
    print(f"{'measure':<34}{'cache':>14}{'reference':>14}{'ratio':>8}  target")
    print(f"{'write MB/s (vs plain file)':<34}{mb / wc:>14.0f}{mb / wp:>14.0f}{wp / wc:>8.2f}  >= 0.5")
    print(f"{'random read values/s (vs bare)':<34}{args.n / rr:>14.0f}{args.n / rb:>14.0f}{rb / rr:>8.2f}  >= 0.9")
    print(f"{'  first read, CRC-32 checked':<34}{args.n / rf:>14.0f}{args.n / rb:>14.0f}{rb / rf:>8.2f}  "
          f"(+{(rf - rn) / args.n * 1e6:.0f} µs per value vs verify=False)")
    print(f"{'  verify=False (no check)':<34}{args.n / rn:>14.0f}{args.n / rb:>14.0f}{rb / rn:>8.2f}")
    print(f"{'bytes on disk per entry':<34}{size / args.n:>14.0f}{payload:>14}{size / args.n / payload:>8.4f}  <= 1.01")


if __name__ == "__main__":
    main()
