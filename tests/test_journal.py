"""The journal on its own (tier 1: a real SQLite file, no sockets): large frames in blob files."""

from __future__ import annotations

import os
from pathlib import Path

from conveyor.dispatcher.journal import BLOB_THRESHOLD, Journal
from conveyor.protocol.commands import TaskOptions

OPTS = TaskOptions(fn="m:f").to_wire()


def test_large_frames_live_in_blob_files_and_come_back(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    big = os.urandom(BLOB_THRESHOLD + 5)
    journal = Journal(path)
    journal.submitted("a", 1, b"client", OPTS, [b"small", big])
    journal.commit()
    journal.close()
    assert len(os.listdir(f"{path}.blobs")) == 1  # the big frame, in a file of its own

    journal = Journal(path)
    (stored,) = list(journal.load())
    assert stored.id == "a" and [bytes(f) for f in stored.frames] == [b"small", big]
    journal.close()


def test_a_job_whose_blob_file_is_gone_is_dropped_and_the_rest_load(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    journal = Journal(path)
    journal.submitted("lost", 1, b"client", OPTS, [os.urandom(BLOB_THRESHOLD)])
    journal.submitted("kept", 2, b"client", OPTS, [b"call"])
    journal.commit()
    journal.close()
    for name in os.listdir(f"{path}.blobs"):  # as if the OS lost the file (no fsync with sync normal)
        os.unlink(Path(f"{path}.blobs") / name)

    journal = Journal(path)
    assert [s.id for s in journal.load()] == ["kept"]
    journal.commit()  # the unreadable job is deleted, so the next start does not meet it again
    journal.close()
    journal = Journal(path)
    assert [s.id for s in journal.load()] == ["kept"]
    journal.close()
