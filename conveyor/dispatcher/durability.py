"""What the dispatcher makes durable, when it acknowledges it, and what it does when its disk fails.

The loop calls in as things happen (all on the loop thread):
- `recover()` at start: the journal's jobs back into the scheduler;
- `submitted()` for each new job, `reply()` for each SUBMIT's ACCEPTED (sent only after the commit
  that holds its jobs: an acknowledged job survives a `kill -9`);
- `turn()` once per loop turn, with the jobs that finished and those forgotten: recorded, and once the
  commit window has passed, handed to the writer thread (committer.py) with the replies waiting for it;
- `committed()` when the writer has woken the loop: replies go out, or, if the commit failed, the
  jobs of that batch that no worker took yet are refused (ACCEPTED `refused`), the rest waits, and new
  jobs are refused until a commit succeeds again (`accepting` is False meanwhile).

Results may go out before their commit: if the dispatcher dies first, the job is still unfinished in the
journal and runs again after the restart, and the client drops the duplicate. Acknowledgements may not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from conveyor.dispatcher.committer import Commit, Committer
from conveyor.dispatcher.journal import Batch, Journal
from conveyor.dispatcher.model import FINISHED_STATES, Job, shift_history
from conveyor.dispatcher.scheduler import OFFLOAD_AFTER_S, OFFLOADED, Scheduler
from conveyor.dispatcher.timing import due_and_expiry
from conveyor.protocol import Cmd
from conveyor.protocol import commands as c

log = logging.getLogger("conveyor.dispatcher")

COMMIT_WINDOW = 0.005  # seconds a journal write may wait for company (and the ACCEPTED of it)

Send = Callable[[bytes, Cmd, Any], bool]


class Durability:
    def __init__(
        self, journal: Journal, scheduler: Scheduler, send: Send, wake: Callable[[], None], result_ttl: float
    ):
        self.journal = journal
        self.scheduler = scheduler
        self._send = send
        self.result_ttl = result_ttl
        self.committer = Committer(journal, wake)
        self._acks: list[tuple[bytes, c.Accepted]] = []  # replies waiting for the next commit
        self._commit_at: float | None = None  # when what this and later turns recorded is committed
        self.on_commit: Callable[[float], None] = lambda seconds: None  # the observer's histogram
        # A standby pair (pair.py): each batch is shipped as it goes to the disk, and while in sync its
        # ACCEPTED replies wait until the passive has it too (release).
        self.replica: Any = None
        self._held: list[tuple[int, list[tuple[bytes, c.Accepted]]]] = []
        self._closed = False

    # --- start and stop -----------------------------------------------------------------------------

    def recover(self) -> list[Job]:
        """Load the journal: finished jobs keep their results, unfinished ones are queued to run again.
        Returns the finished ones (for the listings)."""
        now, now_wall = time.monotonic(), time.time()
        journal = self.journal
        expired = journal.expire(now_wall)
        n_again = 0
        restored: list[Job] = []

        def frames_wanted(opts: bytes) -> bool:  # a call due far ahead stays on disk until it is due
            try:
                eta = c.options_from_raw(opts).eta
            except ValueError:
                return True
            return eta is None or eta - now_wall < OFFLOAD_AFTER_S

        for stored in journal.load(frames_wanted):
            try:
                opts = c.options_from_raw(stored.opts)
            except ValueError as exc:  # written by an older version, or damaged: skip it, keep the rest
                log.error("journal: job %s has unusable options (%s); dropped", stored.id, exc)
                journal.forgotten(stored.id)
                continue
            if stored.state in FINISHED_STATES:
                remaining = (stored.expires_at or now_wall) - now_wall
                restored.append(self.scheduler.restore_finished(
                    stored.id, opts, stored.owner, stored.state, stored.attempts,
                    shift_history(stored.history, now - now_wall),  # the journal keeps wall-clock times
                    stored.result_info, list(stored.result_frames), finished_at=now - (self.result_ttl - remaining),
                ))
            else:
                due, expires = due_and_expiry(opts, now, now_wall)
                frames = OFFLOADED if stored.frames is None else list(stored.frames)
                parents, after, allow = _deps(stored.deps)
                self.scheduler.submit(stored.id, opts, frames, stored.owner, now, due, expires, parents, after, allow,
                                      restoring=True)
                n_again += 1
        self.scheduler.take_actions()  # nobody to deliver to yet: owners re-attach when they reconnect
        log.info(
            "journal %s: %d finished job(s) restored, %d unfinished job(s) queued again, %d expired",
            journal.path, len(restored), n_again, expired,
        )
        self.committer.start()
        return restored

    def close(self) -> None:
        """Let the commit in flight end, commit the rest here and acknowledge it; close the journal.

        A disk that still fails is logged, not raised: the rest of the dispatcher still shuts down."""
        if self._closed:
            return
        self._closed = True
        self.committer.stop()
        done = self.committer.finished()
        if done is not None:
            self._committed(done, time.monotonic())
        batch = self.journal.take_batch()
        if self.replica is not None and batch:
            self.replica.ship(batch)
        try:
            self.journal.write(batch)
        except Exception as exc:
            log.error("journal %s: the last writes could not be saved (%s: %s); unfinished jobs that only they "
                      "held run again after a restart only if their clients re-send them",
                      self.journal.path, type(exc).__name__, exc)
        else:
            self._send_acks(self._acks)
        self.release(None)
        self._acks = []
        self.journal.close(commit=False)

    # --- the loop's calls ---------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Whether new jobs can be made durable now."""
        return self.committer.ok

    @property
    def reason(self) -> str:
        return self.committer.reason

    @property
    def needs_replica(self) -> bool:
        """New jobs must wait: the pair runs with --require-backup and the passive is not in sync."""
        replica = self.replica
        return replica is not None and replica.require_backup and not replica.in_sync

    def submitted(
        self, job: Job, owner: bytes | None, opts: bytes, frames: list[Any], deps: bytes | None = None
    ) -> None:
        self.journal.submitted(job.id, job.seq, owner, opts, frames, deps)

    def reply(self, peer: bytes, reply: c.Accepted) -> None:
        self._acks.append((peer, reply))

    def turn(self, finished: list[Job], forgotten: list[str], now: float, stopping: bool) -> None:
        """Record what finished and what was forgotten this turn; start a commit when it is due."""
        journal = self.journal
        gone = set(forgotten)  # delivered and dropped this turn: nothing to write (journal.forgotten below)
        if finished:
            wall = time.time()
            offset = wall - now
            for job in finished:
                if job.id not in gone:
                    journal.finished(
                        job.id, job.state, job.attempt, shift_history(job.history, offset), job.result_info,
                        job.result_frames, expires_at=wall + self.result_ttl,
                    )
        for job_id in forgotten:
            journal.forgotten(job_id)
        # Group commit: the first turn with something to write sets a deadline COMMIT_WINDOW ahead; the
        # turns until then add to the same batch. Jobs submitted and finished within it are never written.
        committer = self.committer
        if committer.in_flight is not None:
            return  # the next batch grows meanwhile
        if self._commit_at is None:
            if not journal.dirty and not self._acks:
                return
            self._commit_at = now + COMMIT_WINDOW
        if (now < self._commit_at or now < committer.retry_at) and not stopping:
            return
        self._commit_at = None
        if not journal.dirty and self.replica is None:
            # Nothing to write: what these replies accept finished and was forgotten within the window (a
            # lone round trip), or was durable already (a re-send). ACCEPTED goes now, without waking the
            # writer thread and this loop again for an empty commit. (A pair still ships: its passive
            # acknowledges batches in order.)
            acks, self._acks = self._acks, []
            self._send_acks(acks)
            return
        batch = journal.take_batch()
        seq = self.replica.ship(batch) if self.replica is not None else 0
        committer.submit(Commit(batch, self._acks, extra={"seq": seq}))
        self._acks = []

    @property
    def deadline(self) -> float | None:
        """When the loop must wake for the journal (a commit due, or a retry)."""
        if self._commit_at is None or self.committer.in_flight is not None:
            return None
        return max(self._commit_at, self.committer.retry_at)

    def committed(self, now: float) -> None:
        """The writer woke the loop: handle the commit that ended."""
        done = self.committer.finished()
        if done is not None:
            self._committed(done, now)

    def _committed(self, done: Commit, now: float) -> None:
        if done.error is None:
            self.committer.succeeded(now)
            self.on_commit(done.seconds)
            seq = done.extra.get("seq", 0)
            if self.replica is not None:
                self.replica.committed(seq)
            if self.replica is not None and self.replica.must_wait(seq):
                self._held.append((seq, done.acks))  # sent when the passive holds the batch too
            else:
                self._send_acks(done.acks)
            if self.scheduler.n_scheduled:  # durable now: the call of a job due far ahead can stay on disk
                for job_id in done.batch.inserts:
                    self.scheduler.offload(job_id, now)
            return
        self.committer.failed(done.error, now)
        reason = self.committer.reason
        refused: set[str] = set()
        for peer, reply in done.acks:
            accepted = []
            now_refused = list(reply.refused)
            for job_id in reply.accepted:
                # Not durable, not yet acknowledged: a job no worker has taken is refused, so its client
                # knows at once; one already running or finished stays, acknowledged when it is durable.
                if job_id in done.batch.inserts and self.scheduler.refuse(job_id, now):
                    refused.add(job_id)
                    now_refused.append((job_id, reason))
                else:
                    accepted.append(job_id)
            if now_refused or reply.rejected or reply.busy:
                self._send(peer, Cmd.ACCEPTED, c.Accepted([], reply.rejected, reply.busy, now_refused))
            if accepted:
                self._acks.append((peer, c.Accepted(accepted)))
        self.committer.refused += len(refused)
        self.journal.restore(done.batch, dropped=refused)
        if self._commit_at is None:
            self._commit_at = now  # retried at committer.retry_at

    def adopt(self, batch: Batch) -> dict[str, int]:
        """What the other dispatcher of a pair handed over after the two were apart (a merge, pair.py):
        jobs only its journal held, and final states it reached. The rule, per job: a final state beats an
        unfinished one (ours, if running, is stopped); if both ended, ours stands (the job ran on both
        sides: counted). Recorded in our journal like any other change. Returns the counts."""
        now, now_wall = time.monotonic(), time.time()
        counts = {"jobs": 0, "finals": 0, "ran_twice": 0}
        scheduler = self.scheduler
        for job_id, _seq, owner, raw_opts, frames, deps in batch.inserts.values():
            final = batch.finishes.get(job_id)
            known = scheduler.jobs.get(job_id)
            if known is None:
                try:
                    opts = c.options_from_raw(raw_opts)
                except ValueError as exc:
                    log.error("handed over: job %s has unusable options (%s); dropped", job_id, exc)
                    continue
                due, expires = due_and_expiry(opts, now, now_wall)
                # A finished job needs no parents (its dependants here, if any, came with it and follow).
                parents, after, allow = _deps(None if final is not None else deps)
                scheduler.submit(job_id, opts, list(frames), owner, now, due, expires, parents, after, allow,
                                 restoring=True)
                self.journal.submitted(job_id, scheduler.jobs[job_id].seq, owner, raw_opts, list(frames), deps)
                counts["jobs"] += 1
            if final is None:
                continue
            state, attempts, history, info, result, _expires_at, _id = final
            if scheduler.jobs[job_id].state in FINISHED_STATES:
                counts["ran_twice"] += known is not None  # both sides ended it: ours stands
                continue
            scheduler.merge_final(
                job_id, state, attempts, shift_history(_unpacked(history, []), now - now_wall),
                _unpacked(info, {}), list(result), now,
            )
            counts["finals"] += 1
        return counts

    def release(self, upto: int | None) -> None:
        """The passive acknowledged batches up to `upto` (None: replication is degraded, nothing waits for
        it any more): their ACCEPTED replies go out."""
        held, self._held = self._held, []
        for seq, acks in held:
            if upto is None or seq <= upto:
                self._send_acks(acks)
            else:
                self._held.append((seq, acks))

    @property
    def idle(self) -> bool:
        """No commit in flight: the journal holds every batch taken so far (a snapshot may be read)."""
        return self.committer.in_flight is None

    def _send_acks(self, acks: list[tuple[bytes, c.Accepted]]) -> None:
        for peer, reply in acks:
            self._send(peer, Cmd.ACCEPTED, reply)

    def status(self, now: float) -> dict[str, Any]:
        return self.committer.status(now)


def _deps(raw: bytes | None) -> tuple[list[str], list[str], list[str]]:
    """A job's parents as the journal keeps them (clients.py _deps): parents, after, allow_failure."""
    if raw is None:
        return [], [], []
    try:
        parents, after, allow = msgspec.msgpack.decode(raw, type=tuple[list[str], list[str], list[str]])
    except (msgspec.DecodeError, ValueError):
        log.error("journal: unreadable dependencies %r: the job runs without them", raw[:40])
        return [], [], []
    return parents, after, allow


def _unpacked(raw: bytes | None, empty: Any) -> Any:
    """A job's history or result info as the journal keeps them (msgpack), or `empty`."""
    if not raw:
        return empty
    try:
        return msgspec.msgpack.decode(raw)
    except msgspec.DecodeError:
        log.error("journal: unreadable history or result info %r", raw[:40])
        return empty
