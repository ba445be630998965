"""The dispatcher's schedules at work: when they fire, the jobs they create, what the journal keeps of them.

schedules.py holds the rules (pure); this module is the loop's side of them. Each turn the loop asks
`turn(now, wall)`: the schedules whose time has come fire, each slot becomes a job (submitted to the
scheduler like any other, with the schedule's options, due at its slot plus jitter), and the schedules
that changed are recorded in the journal in the same batch as those jobs, so a slot's job and the
schedule's last slot are committed together. While the journal cannot write, nothing fires: the slots
missed meanwhile follow the misfire policy once it can.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from conveyor.dispatcher.durability import Durability
from conveyor.dispatcher.model import FINISHED_STATES, Job
from conveyor.dispatcher.schedule_file import Declared
from conveyor.dispatcher.scheduler import Scheduler
from conveyor.dispatcher.schedules import Fire, Schedules, Spec, decode_entry, encode_entry, slots_after
from conveyor.dispatcher.timing import check_limits, due_and_expiry, fix_times
from conveyor.protocol import Cmd
from conveyor.protocol import commands as c

log = logging.getLogger("conveyor.dispatcher")

Send = Callable[[bytes, Cmd, Any, list[Any]], bool]


class Timetable:
    def __init__(self, scheduler: Scheduler, durability: Durability | None, send: Send):
        self.scheduler = scheduler
        self.durability = durability
        self._send = send
        self.schedules = Schedules(self._unfinished)
        self._options: dict[str, c.TaskOptions] = {}  # by schedule name, read once

    def _unfinished(self, job_id: str) -> bool:
        job = self.scheduler.jobs.get(job_id)
        return job is not None and job.state not in FINISHED_STATES

    # --- the loop's calls -----------------------------------------------------------------------------

    def recover(self) -> None:
        """The journal's schedules back (after its jobs: a slot's job is found again by its id)."""
        if self.durability is None:
            return
        n = 0
        for name, blob in self.durability.journal.load_schedules():
            try:
                self.schedules.restore(decode_entry(blob))
                n += 1
            except ValueError as exc:
                log.error("journal: schedule %s cannot be read back (%s); dropped", name, exc)
        if n:
            log.info("%d schedule(s) restored", n)

    def wake_at(self, now: float, wall: float) -> float | None:
        """When the loop must wake for the schedules (monotonic)."""
        at = self.schedules.next_wake()
        return None if at is None else now + max(0.0, at - wall)

    def turn(self, now: float, wall: float, finished: list[Job]) -> bool:
        """Fire what is due, note what ended, and record every change for the journal; True if jobs were
        created (the loop schedules them without waiting)."""
        created = []
        for job in finished:
            if job.id.startswith("sched:"):
                created += self._create(self.schedules.job_ended(job.id, job.state), now, wall)
        nxt = self.schedules.next_wake()
        if nxt is not None and nxt <= wall and (self.durability is None or self.durability.accepting):
            created += self._create(self.schedules.due(wall), now, wall)
        for job_id in self.schedules.cancel:  # overlap=cancel_previous
            self.scheduler.cancel(job_id, now)
        self.schedules.cancel.clear()
        self._record()
        return bool(created)

    def _record(self) -> None:
        changed, deleted = self.schedules.take_dirty()
        if self.durability is None:
            return
        journal = self.durability.journal
        for entry in changed:
            journal.schedule_saved(entry.spec.name, encode_entry(entry))
        for name in deleted:
            journal.schedule_deleted(name)

    def _create(self, fires: list[Fire], now: float, wall: float) -> list[str]:
        """Each fired slot becomes a job (one per slot: an id seen before is a no-op). A slot's job is due
        at its slot plus jitter; its expiry (expires_in) counts from then."""
        out = []
        for fire in fires:
            entry = self.schedules.entries.get(fire.name)
            if entry is None or fire.job_id in self.scheduler.jobs:
                continue
            template = self._options.get(fire.name)
            try:
                if template is None:
                    template = self._options[fire.name] = _template(entry.options)
                opts = fix_times(template, max(wall, fire.due))
                check_limits(opts, self.scheduler.limits)  # a key undeclared since: skipped, loudly
            except ValueError as exc:
                log.error("schedule %s: slot %s skipped: %s", fire.name, fire.job_id, exc)
                continue
            due, expires = due_and_expiry(opts, now, wall)
            if due is None and fire.due > wall:
                due = now + (fire.due - wall)
            stored = opts if fire.due <= wall else msgspec.structs.replace(opts, eta=fire.due)
            job = self.scheduler.submit(fire.job_id, opts, list(entry.call), None, now, due, expires)
            if self.durability is not None:
                self.durability.submitted(job, None, stored.to_wire(), list(entry.call))
            out.append(fire.job_id)
        return out

    # --- SCHEDULE -----------------------------------------------------------------------------------

    def on_schedule(self, peer: bytes, b: c.ScheduleRequest, frames: list[Any], now: float) -> None:
        wall = time.time()
        reply: dict[str, Any] = {"req": b.req}
        s = self.schedules
        try:
            if b.op in ("upsert", "delete") and b.name in s.entries and s.entries[b.name].origin == "file":
                raise ValueError(f"schedule {b.name!r} is declared in the dispatcher's schedules file: change it there")
            if b.op == "upsert":
                if b.spec is None or not frames:
                    raise ValueError("upsert needs a spec and the task's call")
                spec = _spec(b.name, b.spec)
                opts = _template(b.options)
                check_limits(opts, self.scheduler.limits)
                s.upsert(spec, [bytes(f) for f in frames], opts.to_wire(), wall)
                self._options.pop(b.name, None)
                log.info("schedule %s: %s", b.name, s.view(b.name, wall)["explain"])
                reply["schedules"] = [s.view(b.name, wall)]
            elif b.op == "list":
                reply["schedules"] = [s.view(name, wall) for name in sorted(s.entries)]
            elif b.op == "show":
                reply["schedules"] = [s.view(b.name, wall)]
            elif b.op == "preview" and b.spec is not None:  # a spec not stored: when it would fire
                spec = _spec(b.name or "preview", b.spec)
                spec.check()
                reply["preview"] = slots_after(spec, wall, b.count)
            elif b.op == "preview":
                reply["preview"] = s.preview(b.name, b.count, wall)
                reply["schedules"] = [s.view(b.name, wall)]
            elif b.op == "pause":
                s.pause(b.name, b.until)
                reply["schedules"] = [s.view(b.name, wall)]
            elif b.op == "resume":
                s.resume(b.name)
                reply["schedules"] = [s.view(b.name, wall)]
            elif b.op == "trigger":
                reply["jobs"] = self._create([s.trigger(b.name, wall)], now, wall)
                reply["schedules"] = [s.view(b.name, wall)]
            elif b.op == "backfill":
                if b.start is None or b.end is None or b.end < b.start:
                    raise ValueError("backfill needs a start and an end after it")
                reply["jobs"] = self._create(s.backfill(b.name, b.start, b.end, wall), now, wall)
                reply["schedules"] = [s.view(b.name, wall)]
            elif b.op == "delete":
                if not s.delete(b.name):
                    raise KeyError(f"no schedule {b.name!r}")
            else:
                raise ValueError(f"unknown schedule operation {b.op!r}")
        except (KeyError, ValueError) as exc:
            reply["error"] = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        self._record()
        self._send(peer, Cmd.SCHEDULE_REPLY, c.ScheduleReply(**reply), [])

    def apply_file(self, declared: list[Declared]) -> None:
        """The schedules file, at start: each of its schedules created or changed (keeping its last slot);
        those it declared before and no longer does, deleted. Run-time schedules are left alone."""
        wall = time.time()
        names = {d.spec.name for d in declared}
        for d in declared:
            self.schedules.upsert(d.spec, d.call, _template(d.options.to_wire()).to_wire(), wall, origin="file")
            self._options.pop(d.spec.name, None)
        for name, entry in list(self.schedules.entries.items()):
            if entry.origin == "file" and name not in names:
                self.schedules.delete(name)
                log.info("schedule %s: no longer in the schedules file: deleted", name)
        if declared:
            log.info("%d schedule(s) from the schedules file", len(declared))
        self._record()


def _spec(name: str, b: c.ScheduleSpec) -> Spec:
    return Spec(name, b.cron, b.every_s, b.offset_s, b.tz, b.misfire, b.catchup_window_s, b.max_catchup, b.overlap,
                b.jitter_s, b.pause_on_failure)


def _template(raw: bytes | msgspec.Raw) -> c.TaskOptions:
    """A schedule's task options: those of any job, without a time of its own (the slot is its time)."""
    opts = c.options_from_raw(raw)
    if opts.eta is not None or opts.countdown is not None:
        raise ValueError("a scheduled task cannot have its own eta or countdown: its slot is its time")
    return opts
