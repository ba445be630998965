"""The dispatcher's durable journal: accepted jobs, their outcomes and results, in SQLite (WAL).

Writes are grouped: the loop calls `submitted`, `finished` and `forgotten` as events happen and
`commit()` once per loop turn, which writes them all in one transaction (one fsync). The loop only
acknowledges submissions (ACCEPTED) after that commit returns, so an acknowledged job survives a
`kill -9` of the dispatcher. Within one turn, a job that is submitted, finished and forgotten
(delivered to a client that did not ask to keep it) costs no write at all.

What is durable: every accepted job's call, options and owner; every finished job's state,
attempt history and result until it is delivered-and-forgotten or its TTL expires. Not durable:
which worker is running what (after a restart, unfinished jobs simply run again).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

SCHEMA_VERSION = 1

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
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
"""


def default_journal_path() -> Path:
    """$XDG_STATE_HOME/conveyor/journal.db (~/.local/state/conveyor/journal.db)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "conveyor" / "journal.db"


@dataclass(slots=True)
class StoredJob:
    id: str
    seq: int
    owner: bytes | None
    opts: dict[str, Any]
    frames: list[bytes]
    state: str
    attempts: int
    history: list[dict[str, Any]]
    result_info: dict[str, Any]
    result_frames: list[bytes]
    expires_at: float | None  # wall-clock time


class JournalInUse(RuntimeError):
    pass


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
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(f"journal {self.path} has schema {row[0]}, this Conveyor reads {SCHEMA_VERSION}")
        # Pending writes of this loop turn, by job id: the last word on each job wins.
        self._inserts: dict[str, tuple[Any, ...]] = {}
        self._finishes: dict[str, tuple[Any, ...]] = {}
        self._deletes: set[str] = set()
        self.commits = 0
        self.last_commit_seconds = 0.0

    # --- recording (buffered until commit) ---------------------------------------------------------

    def submitted(
        self, job_id: str, seq: int, owner: bytes | None, opts: dict[str, Any], frames: list[Any]
    ) -> None:
        blob = msgpack.packb([bytes(f) for f in frames], use_bin_type=True)
        self._inserts[job_id] = (job_id, seq, owner, msgpack.packb(opts, use_bin_type=True), blob)
        self._deletes.discard(job_id)

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
            msgpack.packb([bytes(f) for f in result_frames], use_bin_type=True),
            expires_at,
            job_id,
        )

    def forgotten(self, job_id: str) -> None:
        if self._inserts.pop(job_id, None) is not None:
            self._finishes.pop(job_id, None)  # never reached the disk: nothing to write at all
            return
        self._finishes.pop(job_id, None)
        self._deletes.add(job_id)

    @property
    def dirty(self) -> bool:
        return bool(self._inserts or self._finishes or self._deletes)

    def commit(self) -> None:
        """Write everything recorded since the last commit in one transaction."""
        if not self.dirty:
            return
        started = time.perf_counter()
        db = self._db
        db.execute("BEGIN")
        try:
            if self._inserts:
                db.executemany(
                    "INSERT OR IGNORE INTO jobs (id, seq, owner, opts, frames, state) VALUES (?,?,?,?,?,'queued')",
                    self._inserts.values(),
                )
            if self._finishes:
                db.executemany(
                    "UPDATE jobs SET state=?, attempts=?, history=?, result_info=?, result_frames=?, "
                    "expires_at=?, frames=NULL WHERE id=?",
                    self._finishes.values(),
                )
            if self._deletes:
                db.executemany("DELETE FROM jobs WHERE id=?", [(i,) for i in self._deletes])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._inserts.clear()
        self._finishes.clear()
        self._deletes.clear()
        self.commits += 1
        self.last_commit_seconds = time.perf_counter() - started

    # --- recovery and housekeeping -----------------------------------------------------------------

    def load(self) -> Iterator[StoredJob]:
        """Every job in the journal, oldest submission first."""
        rows = self._db.execute(
            "SELECT id, seq, owner, opts, frames, state, attempts, history, result_info, result_frames, expires_at "
            "FROM jobs ORDER BY seq"
        )
        for row in rows:
            yield StoredJob(
                id=row[0],
                seq=row[1],
                owner=row[2],
                opts=msgpack.unpackb(row[3], raw=False),
                frames=msgpack.unpackb(row[4], raw=False) if row[4] is not None else [],
                state=row[5],
                attempts=row[6],
                history=msgpack.unpackb(row[7], raw=False) if row[7] is not None else [],
                result_info=msgpack.unpackb(row[8], raw=False) if row[8] is not None else {},
                result_frames=msgpack.unpackb(row[9], raw=False) if row[9] is not None else [],
                expires_at=row[10],
            )

    def expire(self, now_wall: float | None = None) -> int:
        """Delete finished jobs past their TTL; returns how many."""
        now_wall = time.time() if now_wall is None else now_wall
        cur = self._db.execute("DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (now_wall,))
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return cur.rowcount

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM jobs").fetchone()[0])

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self._db.close()
            self._lock_file.close()
