"""Stage 1 in real subprocesses: a 2-process accelerate launch equals a single process; a run
killed with SIGKILL (one process, or the whole 2-process group) resumes into a complete cache in
which every id appears once and `store verify` is clean; killing the launcher's process group
stops its workers too (torchrun starts them in sessions of their own).

On a machine without CUDA, `accelerate launch --multi_gpu --num_processes 2` starts the two
processes through torchrun and they join over gloo (accelerate 1.15's `--cpu` launcher starts a
single process unless mpirun is configured).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from test_embed import config, model_args, read_all, tiny, write_images  # noqa: F401 (tiny: a fixture)

from embed import embed
from store import CacheReader, verify


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embed_cmd(images, out, checkpoint, *extra) -> list:
    return [sys.executable, "-m", "embed", str(images), "--out", str(out), *model_args(checkpoint), *extra]


def launch_cmd(images, out, checkpoint, *extra) -> list:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    return launch + embed_cmd(images, out, checkpoint, *extra)[1:]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def count(cache) -> int:
    """Entries committed so far (0 before the cache exists); readable while a writer runs."""
    try:
        with CacheReader(cache) as r:
            return len(r)
    except Exception:  # not created yet, or its first transaction not committed
        return 0


def kill_tree(proc) -> None:
    """SIGKILL ``proc`` and every process under it (torchrun starts its workers in new sessions)."""
    family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.wait()


def kill_when(proc, condition, timeout=120.0) -> None:
    """SIGKILL ``proc`` and its descendants as soon as ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed:\n{err.decode()[-3000:]}")
        if time.monotonic() > deadline:
            kill_tree(proc)
            pytest.fail("the run made no progress")
        time.sleep(0.01)
    kill_tree(proc)


def alive(p: psutil.Process) -> bool:
    """Whether ``p`` still runs (a zombie that nobody reaped has stopped)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_two_process_launch_equals_one_process(tmp_path, tiny):
    paths = write_images(tmp_path / "imgs", 23)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    single = embed(config(tmp_path / "imgs", tmp_path / "single", tiny.path, batch_size=4, draft=False))
    r = subprocess.run(launch_cmd(tmp_path / "imgs", tmp_path / "multi", tiny.path, "--batch-size", "4",
                                  "--no-draft", "--json"), capture_output=True, env=env(), timeout=240)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    summary = json.loads(r.stdout)  # printed by the main process only
    assert (summary["processes"], summary["embedded"], summary["failed"]) == (2, 23, 1)
    assert (single.embedded, single.failed) == (23, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "multi", "multi.failures.jsonl", "single",
                                                          "single.failures.jsonl"]  # parts merged, removed
    assert (tmp_path / "multi.failures.jsonl").read_text() == (tmp_path / "single.failures.jsonl").read_text()
    a, b = read_all(tmp_path / "single"), read_all(tmp_path / "multi")
    assert sorted(a) == sorted(b) == sorted(paths)
    for k in a:
        np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), rtol=1e-3, atol=1e-3)
    with CacheReader(tmp_path / "single") as ra, CacheReader(tmp_path / "multi") as rb:
        drop = ("embed_config",)
        assert {k: v for k, v in ra.meta.producer.items() if k not in drop} == \
            {k: v for k, v in rb.meta.producer.items() if k not in drop}
    assert verify(tmp_path / "multi")["bad"] == []


def test_sigkill_then_rerun_completes_the_cache(tmp_path, tiny):
    n = 600
    write_images(tmp_path / "imgs", n, size=(36, 36))
    cache = tmp_path / "cache"
    proc = subprocess.Popen(embed_cmd(tmp_path / "imgs", cache, tiny.path, "--batch-size", "4", "--num-workers",
                                      "1", "-q"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    kill_when(proc, lambda: count(cache) >= 40)
    done = count(cache)
    assert 40 <= done < n
    v = verify(cache)  # what the killed run committed is whole
    assert (v["checked"], v["bad"]) == (done, [])
    s = embed(config(tmp_path / "imgs", cache, tiny.path, batch_size=16))
    assert (s.skipped, s.embedded, s.failed) == (done, n - done, 0)
    v = verify(cache)
    assert (v["checked"], v["bad"]) == (n, [])
    with CacheReader(cache) as r:
        assert sorted(r.keys()) == sorted(f"img_{i}" for i in range(n))  # every id, once


def test_sigkill_of_a_two_process_launch_leaves_parts_the_rerun_merges(tmp_path, tiny):
    n = 400
    write_images(tmp_path / "imgs", n, size=(36, 36))
    cache = tmp_path / "cache"
    part0, part1 = tmp_path / "cache.part0", tmp_path / "cache.part1"
    proc = subprocess.Popen(launch_cmd(tmp_path / "imgs", cache, tiny.path, "--batch-size", "4", "-q"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    kill_when(proc, lambda: count(part0) >= 20 and count(part1) >= 20)
    in_parts = count(part0) + count(part1)
    assert count(cache) == 0 and 40 <= in_parts < n
    s = embed(config(tmp_path / "imgs", cache, tiny.path, batch_size=16))
    assert (s.skipped, s.embedded, s.failed) == (in_parts, n - in_parts, 0)
    assert not part0.exists() and not part1.exists()
    v = verify(cache)
    assert (v["checked"], v["bad"]) == (n, [])


def test_killing_the_launchers_process_group_stops_its_workers(tmp_path, tiny):
    n = 20_000  # one small image listed n times: more work than the workers could finish in the test
    write_images(tmp_path / "imgs", 1, size=(36, 36))
    (tmp_path / "list.txt").write_text("".join(f"{i}\timgs/img_0.png\n" for i in range(n)))
    cache = tmp_path / "cache"
    part0, part1 = tmp_path / "cache.part0", tmp_path / "cache.part1"
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(launch_cmd(tmp_path / "list.txt", cache, tiny.path, "--batch-size", "4", "-q"),
                                stdout=log, stderr=log, env=env(), start_new_session=True)
    deadline = time.monotonic() + 120
    while not (count(part0) >= 4 and count(part1) >= 4):  # both workers are embedding
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc)
            pytest.fail(f"the run ended or made no progress:\n{(tmp_path / 'log').read_text()[-3000:]}")
        time.sleep(0.01)
    family = psutil.Process(proc.pid).children(recursive=True)  # the workers and their decode workers
    assert len(family) >= 2
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun starts its workers in sessions of their own: not in the group
    proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p.pid for p in family if alive(p)]
    for p in family:  # not left behind when the test fails
        if alive(p):
            p.kill()
    assert left == [], "workers still running 30 s after their launcher was killed"
    assert count(cache) == 0 and count(part0) + count(part1) < n  # they stopped rather than finish the run
