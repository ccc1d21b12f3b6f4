"""Stop a launched process when its launcher dies.

torch elastic (``torchrun``, and ``accelerate launch`` with several processes, which runs it) starts
every worker in a session of its own (``start_new_session=True`` in
``torch.distributed.elastic.multiprocessing.subprocess_handler``), so killing the launcher's process
group does not reach the workers: they would go on as orphans, still writing their cache parts
while a rerun starts. Each worker therefore watches its parent and, once it changes (the launcher
died and the worker was re-parented), sends itself SIGTERM: it ends as a kill would, and the whole
batches it committed stay in its part for the rerun to merge.

``prctl(PR_SET_PDEATHSIG)`` is not used: it fires when the *thread* that spawned the worker ends,
and it can only be set in the worker after the launcher may already have died.
"""

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

_watching = False  # one watcher per process, however many runs it makes


def under_launcher() -> bool:
    """Whether this process was started by torchrun / ``accelerate launch`` (torch elastic)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def stop_with_launcher(poll_s: float = 1.0) -> None:
    """Under a launcher, watch the parent from a daemon thread; SIGTERM this process when it dies.

    Does nothing when not launched, or when a watcher already runs.
    """
    global _watching
    if _watching or not under_launcher():
        return
    _watching = True
    threading.Thread(target=_watch, args=(os.getppid(), poll_s), name="embed-launcher-watch",
                     daemon=True).start()


def _watch(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    log.warning("the launcher (pid %d) is gone; stopping this process", parent)
    os.kill(os.getpid(), signal.SIGTERM)
