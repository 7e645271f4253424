"""The job queue: one worker thread per device runs jobs first in, first out; everyone else waits and
can see their place.

A job is queued, then running, then done, failed, cancelled (taken off the queue before it ran) or
interrupted (stopped part-way; it keeps what it had). Its fields are written by the worker thread
and read by the HTTP handlers; the small lock of each job keeps a reader from seeing half an update,
and `Changes` wakes the handlers' coroutines (event streams, waiting requests) from the worker
thread without tying up a thread per waiting client.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED = "queued", "running", "done", "failed", "cancelled", "interrupted"
FINISHED = (DONE, FAILED, CANCELLED, INTERRUPTED)


class Changes:
    """A version counter that coroutines on any event loop can wait on while a thread bumps it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.version = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def bump(self) -> None:
        with self._lock:
            self.version += 1
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed: its waiter is gone with it
                pass

    async def wait(self, seen: int, timeout: float) -> int:
        """Return once the version is past `seen` (at once if it already is) or after `timeout` seconds."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            if self.version != seen:
                return self.version
            self._waiters.add(waiter)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(waiter)
        return self.version


@dataclass
class Job:
    """One request's work and everything a client may ask about it."""

    kind: str
    work: object  # what the runner needs (engine.Work); the queue never looks inside
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    step: int = 0  # sampling steps done in the current batch
    steps: int = 0  # sampling steps of the current batch
    batch_no: int = 0  # which of n_iter batches runs (the web UI's job_no)
    batch_count: int = 1
    preview: Optional[bytes] = None  # PNG of the latest live preview
    preview_step: int = 0
    images: list = field(default_factory=list)  # PIL images
    infotexts: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    info: dict = field(default_factory=dict)  # what the web UI's `info` reports (engine fills it)
    error: Optional[str] = None
    error_status: int = 500
    error_type: str = "RuntimeError"
    interrupt_requested: bool = False
    skip_requested: bool = False
    stopped_early: bool = False  # the runner ended it at an interrupt: its results are partial
    encoded_images: Optional[list] = None  # the images as base64 PNGs, once an answer needed them
    inside: Optional[dict] = None  # a trajectory, attention or edit job's view (native_models.InsideView)
    changes: Changes = field(default_factory=Changes)
    done_event: threading.Event = field(default_factory=threading.Event)

    @property
    def progress(self) -> float:
        """0..1 over all batches."""
        if self.state in FINISHED:
            return 1.0
        if self.state == QUEUED or not self.steps:
            return 0.0
        return min(1.0, (self.batch_no + min(self.step, self.steps) / self.steps) / max(1, self.batch_count))

    def changed(self) -> None:
        self.changes.bump()


class JobQueue:
    """Jobs run one at a time, in order, by `run(job)` on a worker thread of their own."""

    def __init__(self, run: Callable[[Job], None], keep_finished: int = 200):
        self._run = run
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self.current: Optional[Job] = None
        self._jobs: dict[str, Job] = {}
        self._finished: collections.deque[str] = collections.deque()
        self._keep_finished = keep_finished
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.changes = Changes()  # bumped whenever a job starts, ends or leaves the queue

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="sdlab-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what waits, interrupt what runs, and let the worker end."""
        with self._lock:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            if self.current is not None:
                self.current.interrupt_requested = True
            self._lock.notify_all()
        for job in waiting:
            self._finish(job, CANCELLED)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> int:
        """Queue `job`; returns its position (0: it runs next or now)."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._jobs[job.id] = job
            self._waiting.append(job)
            position = self._position(job)
            self._lock.notify_all()
        self.changes.bump()
        return position

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    def _position(self, job: Job) -> Optional[int]:
        if job is self.current:
            return 0
        try:
            return self._waiting.index(job) + (self.current is not None)
        except ValueError:
            return None

    def position(self, job: Job) -> Optional[int]:
        """Jobs ahead of `job` (the running one included); None once it is no longer waiting or running."""
        with self._lock:
            return self._position(job)

    def pending(self) -> int:
        with self._lock:
            return len(self._waiting)

    def cancel(self, job: Job) -> str:
        """Take a queued job off the queue, or ask a running one to stop (it keeps what it has)."""
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                queued = True
            else:
                queued = False
                if job.state == RUNNING:
                    job.interrupt_requested = True
        if queued:
            self._finish(job, CANCELLED)
            self._notify_waiting()
        job.changed()
        return job.state

    def interrupt_current(self) -> None:
        with self._lock:
            if self.current is not None:
                self.current.interrupt_requested = True

    def skip_current(self) -> None:
        """End the running batch early and go on with the next one (the web UI's Skip)."""
        with self._lock:
            if self.current is not None:
                self.current.skip_requested = True

    def _finish(self, job: Job, state: str) -> None:
        job.state = state
        job.finished = time.time()
        with self._lock:
            self._finished.append(job.id)
            while len(self._finished) > self._keep_finished:
                self._jobs.pop(self._finished.popleft(), None)
        job.done_event.set()
        job.changed()
        self.changes.bump()

    def _notify_waiting(self) -> None:
        """Every waiting job's place may have changed: wake its listeners."""
        with self._lock:
            waiting = list(self._waiting)
        for job in waiting:
            job.changed()
        self.changes.bump()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                self.current = job
                job.state = RUNNING
                job.started = time.time()
            job.changed()
            self._notify_waiting()
            try:
                self._run(job)  # sets the results, or error and error_status, and stopped_early
            except Exception as exc:  # the runner reports errors itself; this is a bug in it, kept off the worker
                traceback.print_exc()
                job.error = f"internal error: {type(exc).__name__}: {exc}"
            finally:
                with self._lock:
                    self.current = None
                self._finish(job, FAILED if job.error else INTERRUPTED if job.stopped_early else DONE)
