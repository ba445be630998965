"""When a job may start and when it expires, fixed at acceptance on the dispatcher's clock. Pure.

`countdown` and `expires_in` are relative to acceptance: they become absolute Unix times here, so that
clients' clock skew does not matter and the journal keeps times that survive a restart. `eta` and
`expires_at` are absolute already (the client refuses naive datetimes). Waiting uses the monotonic clock:
`due_in` and `expires_in` below are offsets from now.
"""

from __future__ import annotations

import msgspec

from conveyor.dispatcher.limits import Limits, parse_rule
from conveyor.protocol.commands import TaskOptions
from conveyor.protocol.limitkeys import is_template


def fix_times(opts: TaskOptions, now_wall: float) -> TaskOptions:
    """The options with countdown and expires_in turned into eta and expires_at (Unix times); ValueError if
    they contradict each other."""
    eta, expires_at = opts.eta, opts.expires_at
    if opts.countdown is not None:
        eta = now_wall + opts.countdown if eta is None else max(eta, now_wall + opts.countdown)
    if opts.expires_in is not None:
        at = now_wall + opts.expires_in
        expires_at = at if expires_at is None else min(expires_at, at)
    if eta is not None and expires_at is not None and eta >= expires_at:
        raise ValueError("the job would expire before it is due (eta after expires)")
    if (eta, expires_at) == (opts.eta, opts.expires_at) and opts.countdown is None and opts.expires_in is None:
        return opts
    return msgspec.structs.replace(opts, eta=eta, expires_at=expires_at, countdown=None, expires_in=None)


def check_limits(opts: TaskOptions, limits: Limits) -> None:
    """ValueError unless every limit key the task names is declared (and its own rate_limit parses)."""
    if opts.rate_limit is not None:
        parse_rule(opts.rate_limit)  # raises ValueError with the reason
    for key in opts.limits:
        if is_template(key):
            raise ValueError(f"limit key {key!r} is a template: the client fills in its fields from the call")
        if not limits.known(key):
            raise ValueError(f"unknown limit key {key!r}: declare it on the dispatcher (--limit '{key}=RULE')")


def due_and_expiry(opts: TaskOptions, now: float, now_wall: float) -> tuple[float | None, float | None]:
    """(due, expires) on the monotonic clock whose reading is `now`, from the absolute times of opts."""
    # An overdue job (after a restart) gets a due time in the past: released at once, in due order.
    due = None if opts.eta is None else now + (opts.eta - now_wall)
    expires = None if opts.expires_at is None else now + (opts.expires_at - now_wall)
    return due, expires
