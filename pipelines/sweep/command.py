"""The job a sweep submits for a grid point (:mod:`pipelines.sweep.jobs`), in a module of its own:
submitit unpickles it in the job's first process, which so imports only submitit and this file."""

import sys

from submitit.helpers import Checkpointable, CommandFunction


class PointCommand(CommandFunction, Checkpointable):
    """The command line of a grid point's job, ``python -m pipelines.cli.sweep point OUT NAME``
    (:func:`pipelines.sweep.jobs.run_point`). What submitit pickles is this list of strings. On
    preemption or time out, submitit calls :meth:`checkpoint` and requeues the same command, which
    goes on from the run's last checkpoint."""

    def __init__(self, out, name: str):
        super().__init__([sys.executable, "-m", "pipelines.cli.sweep", "point", str(out), name], verbose=True)

    def checkpoint(self, *args, **kwargs):
        return super().checkpoint(*args, **kwargs)  # the same command: it resumes by itself
