"""fuse-sweep's grid points as scheduler jobs through submitit: the real LocalExecutor runs the same
submission code path as Slurm (a pickled command line, a job per point); a job killed midway is
resumed by the rerun; ``fuse-sweep status`` and ``report`` follow jobs in flight. Slurm itself is not
here: its sbatch script is checked as submitit writes it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from click.testing import CliRunner
from submitit.slurm.slurm import _make_sbatch_string
from test_sweep import RUNS

from pipelines.cli.sweep import main
from pipelines.sweep.command import PointCommand
from pipelines.sweep.jobs import ExecutorConfig


@pytest.fixture(scope="module")
def data(vqa_data):
    return vqa_data(40, 5)  # the data of test_sweep.py: built once when both run


def sweep_cmd(data, out, *extra):
    return [sys.executable, "-m", "pipelines.cli.sweep", "--shards", str(data / "qa"), "--cache",
            f"image={data / 'cache'}", "--fuse-layers", "0,4", "--decoder-layers", "1,2", "--t5", "tiny",
            "--tokenizer", "words", "--steps", "40", "--eval-every", "10", "--batch-size", "8", "--lr", "1e-2",
            "--warmup", "0", "--num-workers", "0", "--threads", "1", "--out", str(out),
            "--executor", "local", "--parallel", "2", *extra]


def wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status_rows(out) -> dict:
    r = CliRunner().invoke(main, ["status", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return {row["run"]: row for row in json.loads(r.output)}


def test_local_jobs_run_the_grid_and_a_job_killed_midway_is_resumed_by_the_rerun(data, tmp_path):
    """A 2x2 grid as submitit local jobs, two at a time. One job is killed (SIGKILL, as an OOM killer
    or a lost node would) after its first checkpoint: status and report show it running, then broken;
    the sweep says so and exits 1; the same command again resumes it from its checkpoint, and leaves
    the finished ones alone."""
    out = tmp_path / "sweep"
    sweep = subprocess.Popen(sweep_cmd(data, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = RUNS[0]
        checkpoint = out / "runs" / victim / "checkpoints" / "last" / "trainer_state.json"
        wait_for(checkpoint.exists, 240, f"{victim}'s first checkpoint")
        record = json.loads((out / "jobs" / f"{victim}.json").read_text())
        rows = status_rows(out)
        assert rows[victim]["status"] == "running" and rows[victim]["job"] == record["job"]["id"]
        r = CliRunner().invoke(main, ["report", str(out)])  # while runs are in flight
        assert r.exit_code == 0, r.output
        assert f"running: {victim} (job {record['job']['id']}): not in the summary until it finishes" in r.output
        started = json.loads((out / "jobs" / f"{victim}.started.json").read_text())
        os.kill(started["pid"], signal.SIGKILL)  # the training process of the job
        output, _ = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 1, output
    assert output.rstrip().endswith(f"Error: 1 job(s) ended before their run finished: {victim} (killed?): run the "
                                    "same command again to resume them")
    assert not (out / "runs" / victim / "results.json").exists()
    rows = status_rows(out)
    assert rows[victim]["status"] == "broken"
    assert [rows[n]["status"] for n in RUNS[1:]] == ["finished"] * 3
    assert all(rows[n]["job"] for n in RUNS)
    finished = {n: (out / "runs" / n / "results.json").read_bytes() for n in RUNS[1:]}

    rerun = CliRunner().invoke(main, sweep_cmd(data, out)[3:])  # in this process; the jobs are processes
    assert rerun.exit_code == 0, rerun.output
    assert f"resume {victim} from its last checkpoint" in (out / "sweep.log").read_text()
    results = json.loads((out / "runs" / victim / "results.json").read_text())
    assert results["steps"] == 40 and [h["step"] for h in results["history"]][-1] == 40
    assert {n: (out / "runs" / n / "results.json").read_bytes() for n in RUNS[1:]} == finished  # not redone
    assert {row["status"] for row in status_rows(out).values()} == {"finished"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] == 4 and summary["broken"] == [] and summary["running"] == []


def test_the_submission_is_a_command_line_and_requeues_itself(tmp_path):
    """What submitit pickles is our command (a list of strings), and a preempted job's checkpoint
    resubmits the same command (the run resumes by itself)."""
    command = PointCommand(tmp_path, "f0-d1-pool_none-r0")
    assert command.command == [sys.executable, "-m", "pipelines.cli.sweep", "point", str(tmp_path),
                               "f0-d1-pool_none-r0"]
    back = cloudpickle.loads(cloudpickle.dumps(command))
    assert back.command == command.command
    again = command.checkpoint()
    assert again.function is command and again.args == () and again.kwargs == {}


def test_slurm_options_become_sbatch_lines():
    ecfg = ExecutorConfig("slurm", partition="gpu", gpus_per_run=2, time_min=90,
                          slurm_opts={"account": "abc", "constraint": "a100"})
    script = _make_sbatch_string(command="python -u -m submitit.core._submit /x", folder="/x/%j",
                                 **ecfg.slurm_parameters("f0-d1-pool_none-r0"))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90",
                 "#SBATCH --account=abc", "#SBATCH --constraint=a100", "#SBATCH --job-name=fuse-f0-d1-pool_none-r0",
                 "#SBATCH --signal=USR2@"):  # submitit's preemption/timeout signal: the job requeues itself
        assert line in script, script


@pytest.mark.parametrize("extra, message", [
    (["--gpus", "0,1"], "Error: --gpus: only with --executor local\n"),
    (["--executor", "local", "--gpus", "0,0"], "Error: --gpus 0,0: GPU ids are distinct integers >= 0\n"),
    (["--executor", "local", "--parallel", "0"], "Error: --parallel 0: must be an integer >= 1\n"),
    (["--executor", "local", "--partition", "gpu"], "Error: --partition: only with --executor slurm\n"),
    (["--executor", "slurm", "--slurm-opt", "account"],
     "Error: --slurm-opt account: expected KEY=VALUE, e.g. --slurm-opt account=abc\n"),
])
def test_bad_executor_flags_exit_2_naming_the_flag(data, tmp_path, extra, message):
    args = ["--shards", str(data / "qa"), "--cache", f"image={data / 'cache'}", "--fuse-layers", "0,4",
            "--out", str(tmp_path / "s"), *extra]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and r.output.endswith(message), r.output
    assert not Path(tmp_path / "s").exists()


def test_slurm_without_slurm_is_one_line(data, tmp_path):
    r = CliRunner().invoke(main, ["--shards", str(data / "qa"), "--cache", f"image={data / 'cache'}",
                                  "--fuse-layers", "0", "--t5", "tiny", "--tokenizer", "words", "--out",
                                  str(tmp_path / "s"), "--executor", "slurm", "--partition", "gpu"])
    assert r.exit_code == 1
    assert r.output.endswith('Error: --executor slurm: Could not detect "srun", are you indeed on a slurm cluster?\n')
