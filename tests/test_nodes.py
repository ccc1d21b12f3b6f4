"""Two "nodes" on this machine: ``accelerate launch --num_machines 2 --machine_rank {0,1}
--main_process_ip 127.0.0.1``, one CPU process each, joined over gloo (without CUDA, ``--multi_gpu``
starts them through torchrun: see tests/test_embed_launch.py), so the multi-node code paths run:
the training stream deals each record to one node once per epoch, fuse-train's eval is summed over
the nodes exactly (here from inline shards: nodes without an LMDB cache), and embed's two nodes make
the cache one process makes, with one writer of each shared file."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_embed import config, model_args, read_all, tiny, write_images  # noqa: F401 (tiny: a fixture)
from test_embed_launch import env, free_port

from embed import embed
from pipelines.cli.eval import main as eval_main
from pipelines.data.shards import shard_paths, write_qa_shards
from pipelines.data.stream import read_records
from store import verify

HERE = Path(__file__).parent


def launch_nodes(*args, timeout=300) -> list:
    """Start the two nodes' launchers, wait for both; ``[(returncode, stdout, stderr)]`` by machine rank."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                               "2", "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip",
                               "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
                               "--dynamo_backend", "no", *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def data(vqa_data):
    return vqa_data(40, 5)


def test_each_training_record_goes_to_one_node_once_per_epoch(data, tmp_path):
    """Shards are dealt to nodes, then to each node's 2 DataLoader workers: one epoch of both nodes
    holds every training record exactly once."""
    runs = launch_nodes(HERE / "node_stream.py", data / "qa", data / "cache", tmp_path)
    assert all(rc == 0 for rc, _, _ in runs), runs[0][2][-3000:] + runs[1][2][-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert all(r["ids"] for r in ranks) and not set(ranks[0]["ids"]) & set(ranks[1]["ids"])
    assert sorted(ranks[0]["ids"] + ranks[1]["ids"]) == sorted(r["id"] for r in read_records(
        shard_paths(data / "qa", "train")))


def test_fuse_train_on_two_nodes_from_inline_shards_scores_every_eval_record_once(data, tmp_path):
    """Nodes without the LMDB cache: the shards carry the values. The eval, summed over the nodes,
    equals fuse-eval of the same checkpoint in one process: every eval record scored once. Only the
    main process writes the run's files and prints the results."""
    write_qa_shards(data / "shapes", tmp_path / "qa", min_shards=2, inline={"image": data / "cache"})
    out = tmp_path / "run"
    runs = launch_nodes("-m", "pipelines.cli.train", "--shards", tmp_path / "qa", "--t5", "tiny", "--tokenizer",
                        "words", "--fuse", "0:question 1:image", "--steps", "4", "--eval-every", "4", "--batch-size",
                        "8", "--num-workers", "0", "--out", out, "--json")
    assert all(rc == 0 for rc, _, _ in runs), runs[0][2][-3000:] + runs[1][2][-3000:]
    results = json.loads(runs[0][1])
    assert runs[1][1] == "" and results == json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2 and results["steps"] == 4
    assert results["config"]["caches"] == {"image": "inline"}
    n_eval = len(read_records(shard_paths(tmp_path / "qa", "eval")))
    assert results["last"]["count"] == n_eval
    r = CliRunner().invoke(eval_main, [str(out), "--json"])  # one process, the same checkpoint
    assert r.exit_code == 0, r.output
    single = json.loads(r.output)
    assert single["count"] == n_eval and single["accuracy"] == pytest.approx(results["last"]["accuracy"], abs=1e-12)


def test_embed_on_two_nodes_makes_the_cache_one_process_makes(tmp_path, tiny):
    paths = write_images(tmp_path / "imgs", 13)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    embed(config(tmp_path / "imgs", tmp_path / "single", tiny.path, batch_size=4, draft=False))
    runs = launch_nodes("-m", "embed", tmp_path / "imgs", "--out", tmp_path / "multi", *model_args(tiny.path),
                        "--batch-size", "4", "--no-draft", "--json")
    assert all(rc == 0 for rc, _, _ in runs), runs[0][2][-3000:] + runs[1][2][-3000:]
    summary = json.loads(runs[0][1])  # the main process prints the summary; the other node prints nothing
    assert runs[1][1] == "" and (summary["processes"], summary["embedded"], summary["failed"]) == (2, 13, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "multi", "multi.failures.jsonl", "single",
                                                          "single.failures.jsonl"]  # parts merged, removed
    a, b = read_all(tmp_path / "single"), read_all(tmp_path / "multi")
    assert sorted(a) == sorted(b) == sorted(paths)  # every id once
    for k in a:
        np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), rtol=1e-3, atol=1e-3)
    assert verify(tmp_path / "multi")["bad"] == []
