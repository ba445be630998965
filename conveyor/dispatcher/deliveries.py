"""Outcomes on their way to clients, until each client says it has them. Pure, no I/O (part of the Scheduler).

A ROUTER drops what it queued for a peer whose TCP connection breaks, and a send that succeeds only
means the message was queued. So a finished job is not forgotten when its JOB_DONE is sent, but when
the client acknowledges it:

- every JOB_DONE to a client gets the next number of that client's sequence (1, 2, ...);
- the client acknowledges the highest number it received (ACK, and again in its heartbeats);
- a job whose every delivery was acknowledged, and that is not `keep`, is forgotten then;
- a delivery whose send failed, or to a client gone for good, is dropped: the job stays until its
  result TTL, so it can still be fetched by id (WATCH);
- a client that sees a gap in the numbers, or reconnects, asks again for everything it misses
  (re-SUBMIT of its unfinished jobs, re-WATCH); each answer is a new delivery with a new number, so an
  acknowledgement of a later number never forgets a job whose redelivery is still on its way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from conveyor.dispatcher.model import FINISHED_STATES, Deliver, Job


class Deliveries:
    def __init__(self, forget: Callable[[Job], None]):
        self._forget = forget  # drop a finished job that every client it was sent to has
        self._pending: dict[bytes, list[Job]] = {}  # this turn's deliveries, by client
        self._withhold: dict[bytes, set[str]] = {}  # of those, jobs to send without their result
        self._seq: dict[bytes, int] = {}  # the last JOB_DONE number per client
        # Sent, not acknowledged: (seq, jobs, those of them sent without their result).
        self._unacked: dict[bytes, deque[tuple[int, list[Job], frozenset[str]]]] = {}

    def add(self, client: bytes, job: Job, withhold: bool = False) -> None:
        """Deliver a finished job to a client at the end of this turn (without its result: its dependants
        use it, and the client fetches it with WATCH if it asks)."""
        self._pending.setdefault(client, []).append(job)
        job.unacked += 1
        if withhold:
            self._withhold.setdefault(client, set()).add(job.id)

    def take(self) -> list[Deliver]:
        """This turn's JOB_DONE messages, numbered."""
        out = []
        for client, jobs in self._pending.items():
            seq = self.number(client)
            withheld = frozenset(self._withhold.get(client, ()))
            self._unacked.setdefault(client, deque()).append((seq, jobs, withheld))
            out.append(Deliver(client, jobs, seq, withheld))
        self._pending = {}
        self._withhold = {}
        return out

    def number(self, client: bytes) -> int:
        """The next JOB_DONE number of this client (also for a JOB_DONE that holds only unknown ids)."""
        seq = self._seq.get(client, 0) + 1
        self._seq[client] = seq
        return seq

    def acked(self, client: bytes, seq: int) -> None:
        """The client has every JOB_DONE up to seq."""
        q = self._unacked.get(client)
        if q is None:
            return
        while q and q[0][0] <= seq:
            _, jobs, withheld = q.popleft()
            for job in jobs:
                # Sent without its result: not delivered, so it stays (result TTL) for the client to fetch.
                self._settle(job, delivered=job.id not in withheld)
        if not q:
            del self._unacked[client]

    def failed(self, client: bytes, seq: int) -> None:
        """The JOB_DONE numbered seq could not be sent (the client is not connected)."""
        q = self._unacked.get(client)
        if q is None:
            return
        for i, (s, jobs, _) in enumerate(q):
            if s == seq:
                del q[i]
                for job in jobs:
                    self._settle(job, delivered=False)
                break
        if not q:
            del self._unacked[client]

    def client_gone(self, client: bytes) -> None:
        """A client not heard from for long: what it did not acknowledge stays until the result TTL."""
        self._seq.pop(client, None)
        for _, jobs, _ in self._unacked.pop(client, ()):
            for job in jobs:
                self._settle(job, delivered=False)
        for job in self._pending.pop(client, ()):
            self._settle(job, delivered=False)
        self._withhold.pop(client, None)

    def unacked(self, client: bytes) -> int:
        """JOB_DONE messages sent to this client and not yet acknowledged."""
        return len(self._unacked.get(client, ()))

    def _settle(self, job: Job, delivered: bool) -> None:
        job.unacked -= 1
        if delivered:
            job.delivered = True
        if job.unacked == 0 and job.delivered and not job.opts.keep and job.state in FINISHED_STATES:
            self._forget(job)  # unless its dependants still need it (Scheduler._forget)
