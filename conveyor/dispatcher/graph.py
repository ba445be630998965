"""Dependencies between jobs: who waits for whom, and what an outcome does to the jobs waiting for it. Pure.

A job may name **parents**: jobs whose results its call refers to (a JobFuture passed as an argument;
their result frames go with its ASSIGN), and jobs it only runs **after**. Until every parent has
finished it is `waiting`: a counter, one decrement per parent outcome, so a fan-in over 100,000 parents
costs O(1) per parent and polls nothing. Then:

- every parent succeeded (or failed where the edge allows it, `allow_failure`): the job becomes
  runnable, and its own delay, expiry and limits apply from that moment;
- a parent failed for good: the job fails at once with `DependencyFailed`, naming the root job (the
  first job of the chain that failed), its function and its error; a parent cancelled or expired: it
  is cancelled with `DependencyCancelled`. Both propagate to every transitive dependant, in the same
  turn (and so in the same journal commit).

A parent's result is **pinned** while a dependant that needs it is unfinished: delivery, ACKs and the
result TTL never drop it before the dependant has run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EARLY_JOIN_MIN = 256  # parents from which a fan-in keeps their results as they come (Node.early)


@dataclass(slots=True)
class Node:
    """A job's place in a graph (only jobs with parents or dependants have one)."""

    parents: tuple[str, ...] = ()  # the results its call refers to, in that order
    after: tuple[str, ...] = ()  # jobs it only runs after
    allow_failure: frozenset[str] = frozenset()  # parents whose failure it accepts (it gets conveyor.Failed)
    waiting: int = 0  # parents not finished yet
    children: list[str] = field(default_factory=list)  # jobs that wait for this one
    pins: int = 0  # unfinished dependants that need this job's result (it stays until they have run)
    root: str | None = None  # a failed or cancelled job: the job whose failure started the chain
    # A large fan-in (EARLY_JOIN_MIN parents or more): each parent's one-frame result, set as the parent
    # succeeds (`slots`: a parent's place in `parents`), so that its ASSIGN does not visit 100,000
    # parents once the last has finished; `n_early` of them are set. Dropped when the job has run.
    slots: dict[str, int] | None = None
    early: list[Any] | None = None
    n_early: int = 0

    def start_early_join(self) -> None:
        """Keep the parents' results as they come (a fan-in whose parents are all distinct)."""
        slots = {parent: i for i, parent in enumerate(self.parents)}
        if len(slots) == len(self.parents):
            self.slots, self.early = slots, [None] * len(self.parents)

    def parent_result(self, parent: str, frames: list[Any]) -> None:
        """A parent succeeded with these result frames: kept if it is one frame (see `early`)."""
        if self.slots is not None and self.early is not None and len(frames) == 1:
            i = self.slots.get(parent)
            if i is not None and self.early[i] is None:
                self.early[i] = frames[0]
                self.n_early += 1

    def joined_early(self) -> list[Any] | None:
        """Every parent's one-frame result, in order, if each came in so (else None: look them up)."""
        if self.early is not None and self.n_early == len(self.parents):
            return self.early
        return None

    def drop_early(self) -> None:
        self.slots = self.early = None
        self.n_early = 0

    @property
    def all_parents(self) -> tuple[str, ...]:
        if not self.after:
            return self.parents
        seen = frozenset(self.parents)
        return self.parents + tuple(p for p in self.after if p not in seen)


class UnknownParent(ValueError):
    """A parent the dispatcher does not hold (never submitted, expired, or forgotten)."""

    def __init__(self, job_id: str, parent: str):
        super().__init__(f"job {job_id} depends on {parent}, which the dispatcher does not know "
                         "(never submitted, or its result was already delivered and forgotten)")
        self.parent = parent
