"""Long jobs the web app shows with a live progress bar (a backup, a restore): what each one
is, how far it got, how it ended. Jobs advance in worker threads or in the agent's tasks; the
pages' server-sent event streams wait on the event loop, so a change is handed over with
``loop.call_soon_threadsafe`` and never waits on a page.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

RUNNING, DONE, FAILED = "running", "done", "failed"
#: progress updates are passed on to the pages at most this often (a backup advances per chunk)
NOTIFY_EVERY = 0.25
#: finished jobs remembered for the pages (the newest ones)
KEEP_FINISHED = 50


@dataclass
class Job:
    id: str
    kind: str  # "backup", "restore", ...
    title: str
    state: str = RUNNING
    bytes_done: int = 0
    bytes_total: int | None = None
    files_done: int = 0
    files_total: int | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    error: str | None = None
    message: str | None = None  # what it waits for now ("unlock the phone"), shown under the bar
    #: what it made, for the page to link: e.g. {"repo": "nas", "snapshot": "3fa2…", "udid": …}
    result: dict[str, Any] = field(default_factory=dict)
    #: what it is about, for pages to find it: e.g. {"udid": …} or {"repo": …, "snapshot": …}
    subject: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Bytes per second since the start (until the end, for a finished job)."""
        elapsed = (self.ended or time.time()) - self.started
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    @property
    def fraction(self) -> float | None:
        if self.state == DONE:
            return 1.0
        if self.bytes_total:
            return min(1.0, self.bytes_done / self.bytes_total)
        if self.files_total:
            return min(1.0, self.files_done / self.files_total)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "title": self.title,
            "state": self.state,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "rate": round(self.rate),
            "fraction": self.fraction,
            "started": self.started,
            "ended": self.ended,
            "error": self.error,
            "message": self.message,
            "result": self.result,
            "subject": self.subject,
        }


class JobProgress:
    """ibsync.progress.Progress feeding a job: what the library reports is what the bar shows."""

    active = True  # someone looks: let the core measure totals up front

    def __init__(self, jobs: Jobs, job: Job) -> None:
        self._jobs, self._job = jobs, job

    def start(self, total_bytes: int | None, total_files: int | None) -> None:
        self._jobs.update(self._job, bytes_total=total_bytes, files_total=total_files, force=True)

    def advance(self, nbytes: int = 0, files: int = 0) -> None:
        self._jobs.advance(self._job, nbytes, files)

    def finish(self) -> None:
        # the transfer is over; committing (a backup's snapshot, a restore's move into place) follows
        self._jobs.update(self._job, message="finishing…", force=True)


class Jobs:
    """The registry: thread-safe; subscribers are asyncio streams on any event loop."""

    def __init__(self, *, describe_result: Callable[[Job, dict[str, Any]], dict[str, Any]] | None = None) -> None:
        #: adds what pages need to a finished job's result (the agent's backups name a snapshot,
        #: the web app knows its page)
        self.describe_result = describe_result
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._version = 0
        self._last_notice = 0.0
        self._subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    # ---- making and moving jobs -----------------------------------------------------------------

    def start(self, kind: str, title: str, *, subject: dict[str, Any] | None = None) -> Job:
        with self._lock:
            job = Job(id=str(next(self._ids)), kind=kind, title=title, subject=dict(subject or {}))
            self._jobs[job.id] = job
            self._forget_old()
        self._changed(force=True)
        return job

    def progress(self, job: Job) -> JobProgress:
        return JobProgress(self, job)

    def advance(self, job: Job, nbytes: int = 0, files: int = 0) -> None:
        with self._lock:
            job.bytes_done += nbytes
            job.files_done += files
        self._changed()

    def update(self, job: Job, *, force: bool = False, **values: Any) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(job, key, value)
        self._changed(force=force)

    def finish(self, job: Job, *, result: dict[str, Any] | None = None) -> None:
        if result and self.describe_result is not None:
            result = {**result, **self.describe_result(job, result)}
        with self._lock:
            job.state, job.ended = DONE, time.time()
            job.message = None
            if job.bytes_total is not None:
                job.bytes_done = max(job.bytes_done, job.bytes_total)
            if result:
                job.result.update(result)
        self._changed(force=True)

    def fail(self, job: Job, error: str) -> None:
        with self._lock:
            job.state, job.ended, job.error = FAILED, time.time(), error
        self._changed(force=True)

    def run_in_thread(
        self,
        kind: str,
        title: str,
        work: Callable[[Job, JobProgress], dict[str, Any] | None],
        *,
        subject: dict[str, Any] | None = None,
        describe_error: Callable[[BaseException], str] = str,
    ) -> Job:
        """Start ``work(job, progress)`` in a thread of its own; what it returns is the job's
        result, what it raises its error (one line, by ``describe_error``)."""
        job = self.start(kind, title, subject=subject)

        def run() -> None:
            try:
                result = work(job, self.progress(job))
            except BaseException as e:  # noqa: BLE001  (a job's end is shown, never lost in a thread)
                self.fail(job, " ".join((describe_error(e) or e.__class__.__name__).split()))
            else:
                self.finish(job, result=result)

        threading.Thread(target=run, name=f"ibsync-job-{job.id}", daemon=True).start()
        return job

    # ---- reading ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self, *, kind: str | None = None) -> list[Job]:
        """Newest first."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if kind is None or j.kind == kind]
        return sorted(jobs, key=lambda j: -int(j.id))

    def running(self, kind: str | None = None, **subject: Any) -> Job | None:
        """The running job of this kind about this subject (e.g. ``udid=...``), if any."""
        for job in self.list(kind=kind):
            if job.state == RUNNING and all(job.subject.get(k) == v for k, v in subject.items()):
                return job
        return None

    def snapshot(self, job_id: str | None = None) -> builtins.list[dict[str, Any]]:
        with self._lock:
            jobs = (
                [self._jobs[job_id]]
                if job_id is not None and job_id in self._jobs
                else ([] if job_id is not None else list(self._jobs.values()))
            )
            return [j.to_dict() for j in sorted(jobs, key=lambda j: -int(j.id))]

    async def subscribe(
        self, job_id: str | None = None, *, keepalive: float = 15.0
    ) -> AsyncIterator[builtins.list[dict[str, Any]]]:
        """The job (or all jobs) now, then again after every change; an unchanged state is
        repeated every ``keepalive`` seconds (so a proxy or a dead page is noticed). Ends after
        sending a finished job's final state."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self._lock:
            self._subscribers.add(entry)
        try:
            while True:
                state = self.snapshot(job_id)
                yield state
                if job_id is not None and (not state or state[0]["state"] != RUNNING):
                    return
                try:
                    await asyncio.wait_for(event.wait(), keepalive)
                except TimeoutError:
                    pass
                event.clear()
        finally:
            with self._lock:
                self._subscribers.discard(entry)

    # ---- internals -------------------------------------------------------------------------------

    def _changed(self, *, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_notice < NOTIFY_EVERY:
                return
            self._last_notice = now
            self._version += 1
            subscribers = list(self._subscribers)
        for loop, event in subscribers:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that page's loop has closed
                pass

    def _forget_old(self) -> None:
        finished = sorted((j for j in self._jobs.values() if j.state != RUNNING), key=lambda j: int(j.id))
        for job in finished[:-KEEP_FINISHED] if len(finished) > KEEP_FINISHED else []:
            del self._jobs[job.id]
