"""The dispatcher's durable journal: accepted jobs, their outcomes and results, in SQLite (WAL).

Writes are grouped: the loop calls `submitted`, `finished` and `forgotten` as events happen and
`commit()` once its commit window (a few ms, several loop turns) has passed, which writes them all in
one transaction (one fsync). The loop only acknowledges submissions (ACCEPTED) after that commit
returns, so an acknowledged job survives a `kill -9` of the dispatcher. Within one window, a job that
is submitted, finished and forgotten (delivered to a client that did not ask to keep it) costs no
write at all.

What is durable: every accepted job's call, options and owner; every finished job's state,
attempt history and result until it is delivered-and-forgotten or its TTL expires. Not durable:
which worker is running what (after a restart, unfinished jobs simply run again).

Large frames (BLOB_THRESHOLD and up: a 10 MB argument, say) are not written into SQLite, where a blob
is cut into 4 KiB overflow pages, each written to the WAL, then again to the database at checkpoint,
and read back page by page to free it (about 80 ms per 10 MB here). Each goes to its own file in
`<journal>.blobs/` instead (one write from the received buffer, about 2 ms per 10 MB), written before
the commit of the row that refers to it (fsynced first with synchronous=FULL) and deleted after the
commit of the row that no longer does; `load()` removes files that no row refers to.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from conveyor.errors import JournalInUse
from conveyor.transport.shm import Segment, copy_segment

log = logging.getLogger("conveyor.dispatcher")

# 2: frames may refer to files in <journal>.blobs/ (a version 1 journal is a valid 2); 3: a job's parents
# (deps), added to older journals on open
SCHEMA_VERSION = 3
BLOB_THRESHOLD = 1 << 20  # frames of this many bytes or more go to their own file
_EXT_FILE = 1  # msgpack extension in a frames column: the frame is in the blob file named by its data

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    owner BLOB,
    opts BLOB NOT NULL,
    frames BLOB,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    history BLOB,
    result_info BLOB,
    result_frames BLOB,
    expires_at REAL,
    deps BLOB
);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS schedules (name TEXT PRIMARY KEY, blob BLOB NOT NULL);
"""


def default_journal_path() -> Path:
    """$XDG_STATE_HOME/conveyor/journal.db (~/.local/state/conveyor/journal.db)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "conveyor" / "journal.db"


@dataclass(slots=True)
class Batch:
    """Journal writes recorded over a few loop turns, committed together: the last word on each job."""

    inserts: dict[str, tuple[Any, ...]]  # job id -> (id, seq, owner, opts, frames, deps)
    finishes: dict[str, tuple[Any, ...]]  # job id -> (state, attempts, history, info, frames, expires_at, id)
    deletes: set[str]
    schedules: dict[str, bytes | None] = field(default_factory=dict)  # name -> schedule (None: deleted)

    def __bool__(self) -> bool:
        return bool(self.inserts or self.finishes or self.deletes or self.schedules)

    @property
    def jobs(self) -> int:
        return len(self.inserts) + len(self.finishes) + len(self.deletes)


def is_disk_full(exc: BaseException) -> bool:
    """Whether a failed write failed for lack of space (SQLite's "database or disk is full", ENOSPC, EDQUOT)."""
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "")
        return name == "SQLITE_FULL" or "full" in str(exc).lower()
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes free for an unprivileged writer on the file system of path (None if it cannot tell)."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@dataclass(slots=True)
class StoredJob:
    id: str
    seq: int
    owner: bytes | None
    opts: bytes  # TaskOptions as msgpack
    frames: list[bytes] | None  # None: left on disk (load's frames_wanted)
    state: str
    attempts: int
    history: list[dict[str, Any]]
    result_info: dict[str, Any]
    result_frames: list[bytes]
    expires_at: float | None  # wall-clock time
    deps: bytes | None = None  # its parents (msgpack [parents, after, allow_failure]), if it has any


class Journal:
    def __init__(self, path: str | os.PathLike[str], synchronous: str = "NORMAL"):
        """synchronous=NORMAL (WAL): a commit survives the dispatcher's death (kill -9, OOM); FULL also
        fsyncs every commit, so it survives the machine's (power loss, kernel panic), at a price."""
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"journal sync must be normal or full, not {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One dispatcher per journal: a second one would interleave two histories.
        self._lock_file = open(str(self.path) + ".lock", "w")  # noqa: SIM115 - held for our lifetime
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise JournalInUse(f"journal {self.path} is in use by another dispatcher") from None
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) in (1, 2):
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
            if "deps" not in columns:
                self._db.execute("ALTER TABLE jobs ADD COLUMN deps BLOB")
            self._db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(f"journal {self.path} has schema {row[0]}, this Conveyor reads {SCHEMA_VERSION}")
        self._full = synchronous.upper() == "FULL"
        self._blobs = Path(str(self.path) + ".blobs")
        self._blobs.mkdir(exist_ok=True)
        self._blob_prefix = secrets.token_hex(4)  # blob file names: <prefix>-<counter>, unique across restarts
        self._blob_counter = 0
        self._call_files: dict[str, list[str]] = {}  # job id -> blob files of its call frames on disk
        self._result_files: dict[str, list[str]] = {}  # job id -> blob files of its result frames
        # Pending writes of this loop turn, by job id: the last word on each job wins. Frames are kept
        # as received (no copy) and encoded at commit.
        self._inserts: dict[str, tuple[Any, ...]] = {}
        self._finishes: dict[str, tuple[Any, ...]] = {}
        self._deletes: set[str] = set()
        self._schedules: dict[str, bytes | None] = {}
        self.commits = 0
        self.last_commit_seconds = 0.0
        self._reader: sqlite3.Connection | None = None  # for read_frames, on the loop thread

    # --- recording (buffered until commit) ---------------------------------------------------------

    def submitted(
        self, job_id: str, seq: int, owner: bytes | None, opts: bytes, frames: list[Any], deps: bytes | None = None
    ) -> None:
        """A job was accepted; `opts` are its TaskOptions as msgpack (TaskOptions.to_wire), `deps` its parents."""
        # A pending delete of the same id (forgotten, then submitted again) stays: deletes are written first.
        self._inserts[job_id] = (job_id, seq, owner, opts, tuple(frames), deps)

    def finished(
        self,
        job_id: str,
        state: str,
        attempts: int,
        history: list[dict[str, Any]],
        result_info: dict[str, Any],
        result_frames: list[Any],
        expires_at: float,
    ) -> None:
        self._finishes[job_id] = (
            state,
            attempts,
            msgpack.packb(history, use_bin_type=True),
            msgpack.packb(result_info, use_bin_type=True),
            tuple(result_frames),
            expires_at,
            job_id,
        )

    def forgotten(self, job_id: str) -> None:
        if self._inserts.pop(job_id, None) is not None:
            self._finishes.pop(job_id, None)  # never reached the disk: nothing to write at all
            return
        self._finishes.pop(job_id, None)
        self._deletes.add(job_id)

    def schedule_saved(self, name: str, blob: bytes) -> None:
        """A schedule was created or changed (it fired, was paused...): written with this batch's jobs, so a
        slot's job and the schedule's last slot are committed together."""
        self._schedules[name] = blob

    def schedule_deleted(self, name: str) -> None:
        self._schedules[name] = None

    def load_schedules(self) -> list[tuple[str, bytes]]:
        return [(row[0], bytes(row[1])) for row in self._db.execute("SELECT name, blob FROM schedules ORDER BY name")]

    @property
    def dirty(self) -> bool:
        return bool(self._inserts or self._finishes or self._deletes or self._schedules)

    # --- committing: a batch at a time, from the writer thread (committer.py) or here ------------------

    def take_batch(self) -> Batch:
        """Everything recorded since the last batch (loop thread); recording goes on into a new one."""
        batch = Batch(self._inserts, self._finishes, self._deletes, self._schedules)
        self._inserts, self._finishes, self._deletes, self._schedules = {}, {}, set(), {}
        return batch

    def restore(self, batch: Batch, dropped: AbstractSet[str] = frozenset()) -> None:
        """Put a batch that failed to commit back in front of what was recorded since (loop thread): the
        newer word on a job wins, and the next commit writes both. `dropped`: jobs refused meanwhile,
        whose insert is not written at all."""
        inserts = {i: row for i, row in batch.inserts.items() if i not in dropped and i not in self._deletes}
        self._inserts = {**inserts, **self._inserts}
        for i, row in batch.finishes.items():
            if i not in self._finishes and i not in self._deletes and i not in dropped:
                self._finishes[i] = row
        self._deletes |= batch.deletes  # deletes are written before inserts: a re-submitted id survives
        self._schedules = {**batch.schedules, **self._schedules}

    def commit(self) -> None:
        """Write everything recorded so far, now, in this thread (start-up, shutdown, tests)."""
        batch = self.take_batch()
        try:
            self.write(batch)
        except BaseException:
            self.restore(batch)
            raise

    def write(self, batch: Batch) -> None:
        """Write one batch in one transaction; on failure nothing of it is written (and it can be
        restored). Only one thread writes at a time: the writer thread, or the loop when none runs."""
        if not batch:
            return
        started = time.perf_counter()
        db = self._db
        written: list[str] = []  # blob files of this commit: removed again if it fails
        call_files: dict[str, list[str]] = {}
        result_files: dict[str, list[str]] = {}
        try:
            inserts = [
                # finished within this batch too: the UPDATE below drops the call frames anyway
                (i, seq, owner, opts, None if i in batch.finishes else self._pack(frames, call_files, i, written), deps)
                for i, seq, owner, opts, frames, deps in batch.inserts.values()
            ]
            finishes = [
                (st, att, hist, info, self._pack(frames, result_files, i, written), exp, i)
                for st, att, hist, info, frames, exp, i in batch.finishes.values()
            ]
            if written and self._full:
                _fsync_dir(self._blobs)
            db.execute("BEGIN")
            # Deletes first: a batch restored after a failure may delete a job that a later batch inserts
            # again under the same id (a client re-sending it); in a fresh batch they never overlap.
            if batch.deletes:
                db.executemany("DELETE FROM jobs WHERE id=?", [(i,) for i in batch.deletes])
            if inserts:
                db.executemany(
                    "INSERT OR IGNORE INTO jobs (id, seq, owner, opts, frames, state, deps) "
                    "VALUES (?,?,?,?,?,'queued',?)",
                    inserts,
                )
            if finishes:
                db.executemany(
                    "UPDATE jobs SET state=?, attempts=?, history=?, result_info=?, result_frames=?, "
                    "expires_at=?, frames=NULL WHERE id=?",
                    finishes,
                )
            if batch.schedules:
                saved = [(n, b) for n, b in batch.schedules.items() if b is not None]
                if saved:
                    db.executemany("INSERT OR REPLACE INTO schedules (name, blob) VALUES (?, ?)", saved)
                gone = [(n,) for n, b in batch.schedules.items() if b is None]
                if gone:
                    db.executemany("DELETE FROM schedules WHERE name=?", gone)
            db.execute("COMMIT")
        except BaseException:
            self._abandon()
            self._unlink(written)
            raise
        if written or self._call_files or self._result_files:
            doomed: list[str] = []  # files no committed row refers to any more
            for job_id in batch.finishes:
                doomed += self._call_files.pop(job_id, ())
                doomed += self._result_files.pop(job_id, ())
            for job_id in batch.deletes:
                doomed += self._call_files.pop(job_id, ())
                doomed += self._result_files.pop(job_id, ())
            self._call_files.update(call_files)
            self._result_files.update(result_files)
            self._unlink(doomed)
        self.commits += 1
        self.last_commit_seconds = time.perf_counter() - started

    def _abandon(self) -> None:
        """After a failed write: end the transaction if SQLite has not ended it itself. On SQLITE_FULL it
        may already have rolled back, and a ROLLBACK then fails ("no transaction is active"): ask
        SQLite whether a transaction is open instead of assuming."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:  # the connection is in a state we cannot repair: log, the next BEGIN tells
                log.error("journal %s: rollback failed: %s", self.path, exc)

    def _pack(self, frames: Sequence[Any], files: dict[str, list[str]], job_id: str, written: list[str]) -> bytes:
        """A frames column: msgpack [bin | ext(file name), ...], large frames written to blob files."""
        items: list[Any] = []
        for frame in frames:
            view = memoryview(frame).cast("B")
            if view.nbytes < BLOB_THRESHOLD:
                items.append(view)
                continue
            self._blob_counter += 1
            name = f"{self._blob_prefix}-{self._blob_counter}"
            fd = os.open(self._blobs / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            written.append(name)
            try:
                if type(frame) is Segment:  # a client's argument in /dev/shm: the kernel copies it
                    copy_segment(frame, fd)
                else:
                    while view.nbytes:
                        view = view[os.write(fd, view) :]
                if self._full:
                    os.fsync(fd)
            finally:
                os.close(fd)
            files.setdefault(job_id, []).append(name)
            items.append(msgpack.ExtType(_EXT_FILE, name.encode()))
        return msgpack.packb(items, use_bin_type=True)  # type: ignore[no-any-return]

    def _unpack(self, blob: bytes | None, files: dict[str, list[str]], job_id: str) -> list[Any]:
        if blob is None:
            return []

        def ext_hook(code: int, data: bytes) -> bytes:
            if code != _EXT_FILE:
                raise ValueError(f"journal {self.path}: unknown frame extension {code}")
            name = data.decode()
            files.setdefault(job_id, []).append(name)
            return (self._blobs / name).read_bytes()

        return msgpack.unpackb(blob, raw=False, ext_hook=ext_hook)  # type: ignore[no-any-return]

    def _note_blobs(self, blob: bytes | None, files: dict[str, list[str]], job_id: str) -> list[Any] | None:
        """Note the blob files a frames column refers to without reading them: the frames stay on disk
        (None)."""
        if blob is not None:

            def ext_hook(code: int, data: bytes) -> None:
                files.setdefault(job_id, []).append(data.decode())

            msgpack.unpackb(blob, raw=False, ext_hook=ext_hook)
        return None

    def read_frames(self, job_id: str) -> list[Any]:
        """A job's call frames, read back from the journal (loop thread; a connection of its own, since the
        writer thread uses the other). Raises LookupError if the job's call is not there."""
        if self._reader is None:
            self._reader = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        row = self._reader.execute("SELECT frames FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None or row[0] is None:
            raise LookupError(f"journal {self.path} holds no call for job {job_id}")
        return self._unpack(row[0], {}, job_id)

    def _unlink(self, names: list[str]) -> None:
        for name in names:
            try:
                os.unlink(self._blobs / name)
            except FileNotFoundError:
                pass

    # --- the standby pair (pair.py): the epoch, and the whole journal as one batch ------------------------

    @property
    def epoch(self) -> int:
        """The epoch of this dispatcher's last activation (0: never active), from the meta table."""
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        return 0 if row is None else int(row[0])

    def save_epoch(self, epoch: int) -> None:
        """Persist the epoch before anything carries it (standby.py PersistEpoch). Only while no writer
        thread runs (a passive dispatcher activating): its own transaction, committed now."""
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (str(epoch),))

    def dump(self) -> Batch:
        """Everything committed, as one batch that writes it again (a snapshot for the passive), read on a
        connection of its own so the writer thread may go on."""
        if self._reader is None:
            self._reader = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        db = self._reader
        inserts: dict[str, tuple[Any, ...]] = {}
        finishes: dict[str, tuple[Any, ...]] = {}
        db.execute("BEGIN")  # one consistent view of jobs and schedules
        try:
            rows = db.execute(
                "SELECT id, seq, owner, opts, frames, state, attempts, history, result_info, result_frames, "
                "expires_at, deps FROM jobs ORDER BY seq"
            ).fetchall()
            schedules = {row[0]: bytes(row[1]) for row in db.execute("SELECT name, blob FROM schedules")}
        finally:
            db.execute("COMMIT")
        for row in rows:
            job_id = row[0]
            try:
                call = self._unpack(row[4], {}, job_id)
                result = self._unpack(row[9], {}, job_id)
            except (OSError, ValueError) as exc:
                log.error("journal %s: job %s cannot be read for the snapshot (%s); left out", self.path, job_id, exc)
                continue
            inserts[job_id] = (job_id, row[1], row[2], bytes(row[3]), tuple(call), row[11])
            if row[5] != "queued":
                finishes[job_id] = (row[5], row[6], row[7], row[8], tuple(result), row[10], job_id)
        return Batch(inserts, finishes, set(), dict(schedules))

    def job_ids(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT id FROM jobs")}

    # --- recovery and housekeeping -----------------------------------------------------------------

    def load(self, frames_wanted: Callable[[bytes], bool] | None = None) -> Iterator[StoredJob]:
        """Every job in the journal, oldest submission first. Once all are read, blob files that no job
        refers to (written for a commit that never happened, or not yet deleted at a crash) are removed.

        `frames_wanted(opts)` False: the job's call frames stay on disk (`frames` is None; read_frames
        gets them when they are needed: a job due far ahead)."""
        rows = self._db.execute(
            "SELECT id, seq, owner, opts, frames, state, attempts, history, result_info, result_frames, expires_at, "
            "deps FROM jobs ORDER BY seq"
        )
        self._call_files.clear()
        self._result_files.clear()
        for row in rows:
            try:
                stored = StoredJob(
                    id=row[0],
                    seq=row[1],
                    owner=row[2],
                    opts=bytes(row[3]),
                    frames=(
                        self._unpack(row[4], self._call_files, row[0])
                        if frames_wanted is None or frames_wanted(row[3])
                        else self._note_blobs(row[4], self._call_files, row[0])  # None: left on disk
                    ),
                    state=row[5],
                    attempts=row[6],
                    history=msgpack.unpackb(row[7], raw=False) if row[7] is not None else [],
                    result_info=msgpack.unpackb(row[8], raw=False) if row[8] is not None else {},
                    result_frames=self._unpack(row[9], self._result_files, row[0]),
                    expires_at=row[10],
                    deps=row[11],
                )
            except (OSError, ValueError) as exc:  # e.g. a blob file lost with the OS (sync normal): skip the job
                log.error("journal %s: job %s cannot be read back (%s); dropped", self.path, row[0], exc)
                self.forgotten(row[0])
                continue
            yield stored
        known = {n for names in (*self._call_files.values(), *self._result_files.values()) for n in names}
        self._unlink([n for n in os.listdir(self._blobs) if n not in known])

    def expire(self, now_wall: float | None = None) -> int:
        """Delete finished jobs past their TTL; returns how many."""
        now_wall = time.time() if now_wall is None else now_wall
        expired: list[str] = []
        if self._result_files:
            rows = self._db.execute("SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (now_wall,))
            expired = [row[0] for row in rows if row[0] in self._result_files]
        cur = self._db.execute("DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (now_wall,))
        for job_id in expired:
            self._unlink(self._result_files.pop(job_id))
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return cur.rowcount

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM jobs").fetchone()[0])

    def close(self, commit: bool = True) -> None:
        """Commit what is recorded (unless told not to), then close; the lock is released either way."""
        try:
            if commit:
                self.commit()
        finally:
            if self._reader is not None:
                self._reader.close()
            self._db.close()
            self._lock_file.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
