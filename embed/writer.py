"""A cache writer on a background thread, so LMDB commits overlap the next forward pass.

The queue is bounded: if the disk is slower than the model, the forward loop waits instead of
piling batches up in memory. Each batch is committed in its own transaction, so a killed run loses
at most the batches still queued or being committed, never part of a value.
"""

import logging
import queue
import threading
import time

from store import CacheWriter

log = logging.getLogger(__name__)


class BackgroundWriter:
    """Feeds ``(ids, values)`` batches to a :class:`store.CacheWriter` from one thread.

    Args:
        writer: an open cache writer; only this object's thread uses it until :meth:`close`.
        depth: batches that may wait in the queue.

    Attributes:
        seconds: time the thread spent converting and committing.
    """

    def __init__(self, writer: CacheWriter, depth: int = 4):
        self.writer = writer
        self.seconds = 0.0
        self._queue = queue.Queue(maxsize=depth)
        self._error = None
        self._thread = threading.Thread(target=self._run, name="embed-cache-writer", daemon=True)
        self._thread.start()

    def put(self, ids: list, values) -> None:
        """Queue one batch; raises the writer's error if an earlier commit failed."""
        self._raise_if_failed()
        self._queue.put((ids, values))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain without writing after a failure; close() re-raises it
            t0 = time.perf_counter()
            try:
                self.writer.put_batch(*item)
                self.writer.flush()
            except BaseException as e:  # handed to the forward loop, which raises it
                self._error = e
            self.seconds += time.perf_counter() - t0

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every queued batch to be committed; re-raise a commit error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:  # the loop failed: still commit what is queued (whole batches), keep the first error
            try:
                self.close()
            except BaseException as e:
                log.error("the cache writer failed too: %s", e)
