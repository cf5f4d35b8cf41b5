"""Micro-batching: requests that arrive while the model is busy are run together as one batch.

One worker thread owns the forward passes (so the event loop never runs the model). It takes the first
waiting job, then every job already queued (up to ``max_batch`` images, waiting at most ``max_wait_s``
for more), and runs each group of compatible jobs (same TTA flag, with or without clinical fields) as one
call. A lone request is not delayed: with ``max_wait_s`` 0 it runs at once, and batches form only
while the model is busy, which is when they help.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

# (images uint8 [N,3,S,S], tta, encoded clinical fields [N,D] or None) -> probabilities [N,C]
PredictFn = Callable[[np.ndarray, bool, "np.ndarray | None"], np.ndarray]


class Busy(Exception):
    """More requests wait than the queue holds: the caller should answer 503 and the client try again."""


@dataclass
class _Job:
    images: np.ndarray
    tta: bool
    clinical: np.ndarray | None
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple[bool, bool]:
        return self.tta, self.clinical is not None


class MicroBatcher:
    """Runs ``predict`` in its own thread on batches of the jobs :meth:`submit` queues."""

    def __init__(self, predict: PredictFn, max_batch: int = 32, max_wait_s: float = 0.0,
                 on_batch: Callable[[int], None] | None = None, max_queue: int = 256) -> None:
        self._predict, self.max_batch, self.max_wait_s = predict, max_batch, max_wait_s
        self._on_batch = on_batch or (lambda n: None)
        # bounded: under overload requests are refused at once (Busy) instead of piling up in memory
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, images: np.ndarray, tta: bool = False, clinical: np.ndarray | None = None) -> Future:
        """Queue images [N,3,S,S]; the future gives their probabilities [N,C] (or the exception). Busy when
        ``max_queue`` jobs already wait."""
        job = _Job(images, tta, clinical)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self._queue.maxsize} requests are waiting for the model; try again shortly") from None
        return job.future

    def on_batch(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(images)`` after each forward pass (the app's batch-size histogram)."""
        self._on_batch = callback

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._gather(first)
            for key in dict.fromkeys(job.key for job in jobs):
                self._run_group([job for job in jobs if job.key == key])
            if stop:
                return

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """``first`` and the jobs queued behind it, up to max_batch images; True when close() was called."""
        jobs, count = [first], len(first.images)
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic())) if self.max_wait_s \
                    else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            count += len(job.images)
        return jobs, False

    def _run_group(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        images = np.concatenate([job.images for job in jobs])
        clinical = None if jobs[0].clinical is None else np.concatenate([job.clinical for job in jobs])
        try:
            probs = self._predict(images, jobs[0].tta, clinical)
        except BaseException as exc:  # handed to every waiting request; the worker keeps serving
            for job in jobs:
                job.future.set_exception(exc)
            return
        self._on_batch(len(images))
        start = 0
        for job in jobs:
            job.future.set_result(probs[start:start + len(job.images)])
            start += len(job.images)
