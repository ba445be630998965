"""The journal's group commit, on a thread of its own, and the journal's health.

The loop records writes as they happen (Journal.submitted / finished / forgotten) and, once the commit
window has passed, hands that batch, with the ACCEPTED replies waiting for it, to the writer thread.
The loop goes on receiving, assigning and answering heartbeats while the disk works: a commit that
takes seconds (fsync on a congested device) starves nothing. When the commit is done, the writer
wakes the loop, which sends the replies. One commit is in flight at a time; what is recorded meanwhile
waits for the next, so a slow disk makes bigger batches and slower ACCEPTED replies: submitters wait
(backpressure), nobody is declared lost.

A commit that fails (the disk is full, or any other write error) writes nothing: the loop puts the batch
back in front of what was recorded since, refuses new jobs with the reason (`refusing`), keeps serving
everything else, and tries again every RETRY_S until a commit succeeds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from conveyor.dispatcher.journal import Batch, Journal, free_bytes, is_disk_full
from conveyor.protocol.commands import Accepted

log = logging.getLogger("conveyor.dispatcher")

RETRY_S = 0.5  # seconds between two attempts to commit while the journal is failing


@dataclass(slots=True)
class Commit:
    """One batch on its way to the disk, and the replies that wait for it."""

    batch: Batch
    acks: list[tuple[bytes, Accepted]]
    error: BaseException | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Committer:
    def __init__(self, journal: Journal, wake: Callable[[], None]):
        self.journal = journal
        self._wake = wake
        self._todo: queue.SimpleQueue[Commit | None] = queue.SimpleQueue()
        self._done: list[Commit] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.in_flight: Commit | None = None
        self.state = "ok"  # ok | full (no space left) | failing (another write error)
        self.reason = ""  # why it refuses, in one line, while not ok
        self.since: float | None = None  # monotonic time it stopped writing
        self.retry_at = 0.0
        self.refused = 0  # jobs refused because they could not be made durable

    # --- the writer thread ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write, name="conveyor-journal", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        while True:
            commit = self._todo.get()
            if commit is None:
                return
            started = time.perf_counter()
            try:
                self.journal.write(commit.batch)
            except Exception as exc:  # reported to the loop, which decides; never the end of this thread
                commit.error = exc
            commit.seconds = time.perf_counter() - started
            with self._lock:
                self._done.append(commit)
            self._wake()

    def stop(self) -> None:
        """Let the commit in flight end, then stop the thread (the loop commits the rest itself)."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None

    # --- the loop's side ----------------------------------------------------------------------------------

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def submit(self, commit: Commit) -> None:
        assert self.in_flight is None, "one commit at a time"
        self.in_flight = commit
        self._todo.put(commit)

    def finished(self) -> Commit | None:
        """The commit in flight, once it has ended (loop thread)."""
        with self._lock:
            if not self._done:
                return None
            commit = self._done.pop()
        self.in_flight = None
        return commit

    def failed(self, exc: BaseException, now: float) -> None:
        """A commit failed: refuse new jobs until one succeeds; say so once."""
        full = is_disk_full(exc)
        space = free_bytes(self.journal.path)
        where = f"journal {self.journal.path}"
        if full:
            left = "" if space is None else f" ({space:,} bytes left)"
            reason = f"the dispatcher's journal disk is full: {where}{left}"
        else:
            reason = f"the dispatcher cannot write its journal: {where}: {type(exc).__name__}: {exc}"
        if self.ok:
            log.error("%s; refusing new jobs until a write succeeds (serving everything else)", reason)
            self.since = now
        self.state = "full" if full else "failing"
        self.reason = reason
        self.retry_at = now + RETRY_S

    def succeeded(self, now: float) -> None:
        if not self.ok:
            log.error(
                "journal %s: writes succeed again after %.1f s; accepting new jobs",
                self.journal.path, now - (self.since or now),
            )
        self.state, self.reason, self.since = "ok", "", None

    def status(self, now: float) -> dict[str, Any]:
        """What `conveyor status` and the dashboard show of the journal."""
        return {
            "state": self.state,
            "path": str(self.journal.path),
            "reason": self.reason or None,
            "since_s": None if self.since is None else round(now - self.since, 3),
            "free_bytes": free_bytes(self.journal.path),
            "refused": self.refused,
            "commits": self.journal.commits,
        }
