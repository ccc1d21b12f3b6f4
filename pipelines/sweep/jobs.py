"""A sweep's grid points as scheduler jobs, through submitit (https://github.com/facebookincubator/submitit).

``fuse-sweep --executor local`` runs several points at once on this machine (``--parallel N`` on the
CPU, or one per GPU of ``--gpus 0,1,2,3``) with submitit's ``LocalExecutor`` and waits for them;
``--executor slurm`` submits every point as a Slurm job (``--partition``, ``--gpus-per-run``,
``--time``, ``--slurm-opt KEY=VALUE`` passed to sbatch) and returns: ``fuse-sweep status`` and
``fuse-sweep report`` follow the runs, and rerunning the same command submits what is neither
finished nor queued nor running.

What is submitted is a command line, ``python -m pipelines.cli.sweep point OUT NAME``
(:class:`PointCommand`, a ``submitit.helpers.CommandFunction``): submitit pickles that object (the
list of strings) to hand it to the job; the run's settings travel as JSON (``OUT/jobs/NAME.json``),
and nothing read from disk is ever unpickled here (submitit's result pickles are not read: the run
folder says how a point ended). The job runs :func:`run_point`, the same code as a point of a
serial sweep: resume from the last checkpoint when there is one (a killed or preempted job, or a
Slurm requeue: :meth:`PointCommand.checkpoint` resubmits the same command), a failure recorded in
``failed.json``.

The sweep folder stays the truth: ``OUT/jobs/NAME.json`` names the point's job (executor, id,
submitit's folder of its logs) and :func:`point_states` asks the scheduler about the jobs of the
points not finished or failed.
"""

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import SweepError
from ..files import write_atomic
from ..train.config import TrainConfig
from .command import PointCommand
from .grid import RUNS
from .report import classify

log = logging.getLogger(__name__)

JOBS = "jobs"  # OUT/jobs/: NAME.json per submitted point, submitit/ its logs and submissions
EXECUTORS = ("serial", "local", "slurm")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's LocalExecutor kills a job after timeout_min (default 2 minutes)
# Slurm job states (sacct) that mean the job will still run, or runs.
QUEUED = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "CONFIGURING")
RUNNING = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING")


@dataclass
class ExecutorConfig:
    """Where a sweep's points run.

    Attributes:
        kind: ``serial`` (one after another in this process), ``local`` (submitit jobs on this
            machine) or ``slurm`` (``--executor``).
        parallel: points at once with ``local`` on the CPU (``--parallel``).
        gpus: with ``local``, one point per GPU of these ids at once (``--gpus 0,1,2,3``).
        partition, gpus_per_run, time_min, slurm_opts: with ``slurm``: ``--partition``,
            ``--gpus-per-run``, ``--time`` (minutes), ``--slurm-opt KEY=VALUE`` (sbatch's own options,
            e.g. ``account=abc``, ``constraint=a100``, ``mem=64G``).
        poll_s: seconds between looks at running local jobs.
    """

    kind: str = "serial"
    parallel: int = 1
    gpus: tuple = ()
    partition: str = ""
    gpus_per_run: int = 1
    time_min: int = 24 * 60
    slurm_opts: dict = field(default_factory=dict)
    poll_s: float = 2.0

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ValueError(f"--executor {self.kind}: choose one of {', '.join(EXECUTORS)}")
        self.gpus = tuple(self.gpus)
        for name, value, low in (("--parallel", self.parallel, 1), ("--gpus-per-run", self.gpus_per_run, 0),
                                 ("--time", self.time_min, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} {value}: must be an integer >= {low}")
        if any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in self.gpus) \
                or len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"--gpus {','.join(map(str, self.gpus))}: GPU ids are distinct integers >= 0")
        local_only = [f for f, given in (("--gpus", self.gpus), ("--parallel", self.parallel != 1)) if given]
        if local_only and self.kind != "local":
            raise ValueError(f"{local_only[0]}: only with --executor local")
        if self.gpus and self.parallel != 1:
            raise ValueError("--parallel: with --gpus, one point runs per GPU; give one or the other")
        slurm_only = [f for f, given in (("--partition", self.partition), ("--slurm-opt", self.slurm_opts))
                      if given]
        if slurm_only and self.kind != "slurm":
            raise ValueError(f"{slurm_only[0]}: only with --executor slurm")

    def slots(self) -> list:
        """The local executor's slots: a GPU id each, or ``None`` per CPU point at once."""
        return list(self.gpus) if self.gpus else [None] * self.parallel

    def slurm_parameters(self, name: str) -> dict:
        """submitit ``SlurmExecutor.update_parameters`` arguments of a point's job."""
        params = {"job_name": f"fuse-{name}", "time": self.time_min, "gpus_per_node": self.gpus_per_run,
                  "nodes": 1, "ntasks_per_node": 1}
        if self.partition:
            params["partition"] = self.partition
        if self.slurm_opts:
            params["additional_parameters"] = dict(self.slurm_opts)
        return params


def jobs_dir(out) -> Path:
    return Path(out) / JOBS


def write_point(out, name: str, run: TrainConfig) -> Path:
    """``OUT/jobs/NAME.json`` with the run's settings (what the job trains), before it is submitted."""
    path = jobs_dir(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"config": run.to_dict()}, indent=2) + "\n")
    return path


def read_point(out, name: str) -> dict:
    path = jobs_dir(out) / f"{name}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SweepError(f"{path}: no readable job record ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise SweepError(f"{path}: not a job record (no config)")
    return record


def update_point(out, name: str, **fields) -> None:
    """Add ``fields`` to ``OUT/jobs/NAME.json`` (only the submitting process writes it)."""
    record = read_point(out, name)
    record.update(fields)
    write_atomic(jobs_dir(out) / f"{name}.json", json.dumps(record, indent=2) + "\n")


def started_path(out, name: str) -> Path:
    """``OUT/jobs/NAME.started.json``: the job's own record (host, pid, time), a file of its own so
    that the job and the submitting process never write one file."""
    return jobs_dir(out) / f"{name}.started.json"


def run_point(out, name: str, train_fn=None) -> dict:
    """A grid point's job: train it (resumed from its last checkpoint when it has one), record a
    failure in ``failed.json``.

    Returns:
        The run's results.

    Raises:
        Exception: the training's error, after recording it.
    """
    from .run import run_one

    run = TrainConfig(**read_point(out, name)["config"])
    write_atomic(started_path(out, name),
                 json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}) + "\n")
    run_dir = Path(run.out)
    status, reason, _ = classify(run_dir) if run_dir.exists() else ("todo", "", None)
    return run_one(run, name, status, reason, train_fn=train_fn, reraise=True)


def _job_state(record: dict) -> str:
    """``queued``, ``running`` or ``ended`` of a point's job record (``""``: never submitted)."""
    job = record.get("job")
    if not job:
        return ""
    if job["executor"] == "local":
        if job.get("host") != socket.gethostname():
            return "ended"  # another machine's local job: not ours to see
        try:
            os.kill(int(job["id"]), 0)  # the job's controller process
        except (ProcessLookupError, ValueError):
            return "ended"
        except PermissionError:
            return "running"
        return "running"
    import submitit

    state = submitit.SlurmJob(job["folder"], str(job["id"])).state  # sacct; UNKNOWN when it cannot tell
    return "queued" if state in QUEUED else "running" if state in RUNNING or state == "UNKNOWN" else "ended"


def point_states(out, names) -> list:
    """``[{"run", "status", "job", "reason"}]`` per point: ``finished``, ``failed``, ``running`` or
    ``queued`` (its job, per the scheduler), ``broken`` (a run folder, no live job: rerun the sweep
    to resume it) or ``todo``."""
    rows = []
    for name in names:
        run_dir = Path(out) / RUNS / name
        status, reason, _ = classify(run_dir) if run_dir.exists() else ("todo", "", None)
        job_id = ""
        if (jobs_dir(out) / f"{name}.json").exists():
            record = read_point(out, name)
            job_id = str((record.get("job") or {}).get("id", ""))
            if status not in ("finished", "failed") and _job_state(record) in ("queued", "running"):
                status, reason = _job_state(record), ""
        rows.append({"run": name, "status": status, "job": job_id, "reason": reason})
    return rows


def live(out, name: str) -> bool:
    """Whether a point has a job queued or running (not to be run or deleted again)."""
    return point_states(out, [name])[0]["status"] in ("queued", "running")


def make_executor(ecfg: ExecutorConfig, out):
    """submitit's executor for ``ecfg`` (logs and submissions in ``OUT/jobs/submitit``)."""
    import submitit

    folder = jobs_dir(out) / "submitit"
    if ecfg.kind == "slurm":
        try:
            return submitit.SlurmExecutor(folder=folder)
        except RuntimeError as e:  # 'Could not detect "srun", are you indeed on a slurm cluster?'
            raise SweepError(f"--executor slurm: {e}") from None
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    return executor


def submit(executor, ecfg: ExecutorConfig, out, name: str, run: TrainConfig, slot=None):
    """Submit one point: its settings to ``OUT/jobs/NAME.json``, then its :class:`PointCommand`."""
    write_point(out, name, run)
    if ecfg.kind == "slurm":
        executor.update_parameters(**ecfg.slurm_parameters(name))
    elif slot is not None:
        executor.update_parameters(gpus_per_node=1, visible_gpus=(slot,))
    job = executor.submit(PointCommand(out, name))
    update_point(out, name, job={"executor": ecfg.kind, "id": str(job.job_id), "folder": str(executor.folder),
                                 "host": socket.gethostname(), "slot": slot, "submitted": time.time()})
    log.info("submitted %s: %s job %s%s", name, ecfg.kind, job.job_id, f" on GPU {slot}" if slot is not None else "")
    return job


def run_jobs(ecfg: ExecutorConfig, out, runs: list, executor=None) -> dict:
    """Run ``runs`` (``[(name, TrainConfig)]``) as jobs: ``slurm`` submits them all and returns;
    ``local`` keeps ``ecfg.slots()`` of them running and returns when all have ended.

    Returns:
        ``{"submitted": {name: job id}}``.
    """
    executor = executor or make_executor(ecfg, out)
    submitted = {}
    if ecfg.kind == "slurm":
        for name, run in runs:
            submitted[name] = submit(executor, ecfg, out, name, run).job_id
        return {"submitted": submitted}
    pending, active, free = list(runs), {}, ecfg.slots()
    while pending or active:
        for name, (job, slot) in list(active.items()):
            if job.done():  # the process ended: how, the run folder says (no result pickle is read)
                del active[name]
                free.append(slot)
                log.info("job of %s ended: %s", name, point_states(out, [name])[0]["status"])
        while pending and free:
            name, run = pending.pop(0)
            slot = free.pop(0)
            if slot is None and run.threads is None:  # CPU points side by side: each its share of the cores
                run = replace(run, threads=max(1, (os.cpu_count() or 1) // ecfg.parallel))
            job = submit(executor, ecfg, out, name, run, slot)
            active[name], submitted[name] = (job, slot), job.job_id
        if active:
            time.sleep(ecfg.poll_s)
    return {"submitted": submitted}

