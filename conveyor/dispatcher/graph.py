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
