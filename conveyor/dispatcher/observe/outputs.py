"""Task output held by the dispatcher: the tail of each stream of each job, within one budget for all jobs.

A store of its own, apart from observe.py, because it has its own memory rule: each stream keeps its last
`limit` characters, all outputs together at most `budget` characters, and over budget the output of the
jobs that finished longest ago goes first. The Observer writes it from OUTPUT messages and reads it for
JOB_INFO, LOGS and the DONE replies, all on the dispatcher's loop thread.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

OUTPUT_LIMIT = 64 * 1024  # characters kept per stream of a job (the tail)
OUTPUT_BUDGET = 256 * 1024 * 1024  # characters of output held for all jobs together


class StreamTail:
    """The last `limit` characters of a stream, and how many characters it has had in all (`end`)."""

    __slots__ = ("end", "parts", "size")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.end = 0

    def append(self, text: str, limit: int) -> int:
        """Add text; returns the change in characters held."""
        before = self.size
        self.parts.append(text)
        self.size += len(text)
        self.end += len(text)
        if self.size > 2 * limit:  # amortised: one join per `limit` characters at most
            tail = "".join(self.parts)[-limit:]
            self.parts = [tail]
            self.size = len(tail)
        return self.size - before

    def text(self, limit: int) -> str:
        if len(self.parts) > 1:
            self.parts = ["".join(self.parts)]
        return self.parts[0][-limit:] if self.parts else ""

    def since(self, offset: int, limit: int) -> tuple[int, str]:
        """(start, text): the characters from `offset` on that are still held; start > offset if some were lost."""
        held = self.text(limit)
        start = self.end - len(held)
        if offset >= self.end:
            return self.end, ""
        if offset <= start:
            return start, held
        return offset, held[offset - start :]


class JobOutput:
    __slots__ = ("attempt", "size", "streams")

    def __init__(self, attempt: int):
        self.attempt = attempt
        self.streams: dict[str, StreamTail] = {}
        self.size = 0

    def texts(self, limit: int) -> dict[str, str]:
        return {name: tail.text(limit) for name, tail in self.streams.items() if tail.end}


class OutputStore:
    """The output of each job the dispatcher holds, by job id, and `chars`, the characters held in all.

    Read it like a dict (`in`, `len`); change it only through its methods, which keep `chars` in step.
    """

    def __init__(self, limit: int = OUTPUT_LIMIT, budget: int = OUTPUT_BUDGET):
        self.limit = limit
        self.budget = budget
        self.chars = 0
        self._jobs: dict[str, JobOutput] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # finished jobs with output, oldest first

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def write(self, job_id: str, attempt: int, stream: str, text: str) -> None:
        """Add text to one stream of a job's attempt (the caller checked that the attempt is current)."""
        limit = self.limit
        out = self._jobs.get(job_id)
        if out is None or out.attempt < attempt:
            if out is not None:  # a new attempt starts with empty streams; readers' offsets still grow
                self.chars -= out.size
                old = out
                out = JobOutput(attempt)
                for name, previous in old.streams.items():
                    fresh = StreamTail()
                    fresh.end = previous.end
                    out.streams[name] = fresh
            else:
                out = JobOutput(attempt)
            self._jobs[job_id] = out
        tail = out.streams.get(stream)
        if tail is None:
            tail = out.streams[stream] = StreamTail()
        delta = tail.append(text[-limit:] if len(text) > limit else text, limit)
        out.size += delta
        self.chars += delta

    def finished(self, job_id: str) -> JobOutput | None:
        """The job finished: from now on its output may be evicted. Returns that output, if it has any."""
        out = self._jobs.get(job_id)
        if out is not None:
            self._finished[job_id] = None
        return out

    def drop(self, job_id: str) -> None:
        out = self._jobs.pop(job_id, None)
        if out is not None:
            self.chars -= out.size
            self._finished.pop(job_id, None)

    def evict(self) -> None:
        """Over budget: drop the output of the jobs that finished longest ago."""
        while self.chars > self.budget and self._finished:
            job_id, _ = self._finished.popitem(last=False)
            out = self._jobs.pop(job_id, None)
            if out is not None:
                self.chars -= out.size

    def texts(self, job_id: str) -> dict[str, str] | None:
        out = self._jobs.get(job_id)
        return out.texts(self.limit) if out is not None else None

    def since(self, job_id: str, offsets: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each stream of a job from the reader's offset on (LOGS): where the text starts, the end, the text."""
        out = self._jobs.get(job_id)
        streams: dict[str, dict[str, Any]] = {}
        if out is not None:
            for name, tail in out.streams.items():
                offset = offsets.get(name, 0)
                start, text = tail.since(int(offset) if isinstance(offset, int) else 0, self.limit)
                streams[name] = {"start": start, "end": tail.end, "text": text}
        return streams
