"""Following the active dispatcher of a standby pair, and refusing a stale one (docs/standby.md).

A worker or client given several dispatcher addresses (`tcp://a:5555,tcp://b:5555`) talks to one at a
time. `Failover` decides when to go to another: a passive dispatcher's REDIRECT that names the active
(at once), one that does not (ask the same one again shortly: our asking is the vote a takeover needs),
or silence for `settle_s`, or `settle_s` of REDIRECTs that name no active (a passive cut off from
its peer cannot tell; the other address may serve). It also fences: it remembers the highest epoch
obeyed (`seen`, sent with every message) and refuses any message of a lower epoch (`admit`; the caller
answers STALE and counts it). Pure logic, no socket: the client's and the worker's loops call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conveyor.protocol import Cmd
from conveyor.protocol import commands as c
from conveyor.protocol.frames import frame_epoch

SETTLE_S = 2.0  # silence after which another address is tried (at least the pair's failover timeout)
ASK_AGAIN_S = 0.25  # a passive that knows no active is asked again this much later


_REDIRECT = bytes((Cmd.REDIRECT,))


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """`tcp://a:1,tcp://b:2` or a list of addresses -> the addresses (ValueError if none)."""
    items = addresses.split(",") if isinstance(addresses, str) else [a for x in addresses for a in x.split(",")]
    out = [a.strip() for a in items if a.strip()]
    if not out:
        raise ValueError("no dispatcher address given")
    return out


class Failover:
    def __init__(self, addresses: str | Sequence[str], settle_s: float = SETTLE_S):
        self.addresses = parse_addresses(addresses)
        self.index = 0
        self.settle_s = settle_s
        self.seen = 0  # the highest dispatcher epoch obeyed
        self.stale = 0  # messages refused for a lower epoch
        self.redirects = 0
        self.switches = 0
        self._since = 0.0  # when we started talking to the current address (silence counts from then)
        self._due: tuple[float, int] | None = None  # (when, which address) a redirect decided
        # Since when the current address has answered only "passive, no active known" (a REDIRECT naming
        # none): after settle_s of that, the next address is tried (in a split of the pair's link, the
        # passive does not hear the active, which may still serve at the other address).
        self._unserved_since: float | None = None

    @property
    def current(self) -> str:
        return self.addresses[self.index]

    @property
    def several(self) -> bool:
        return len(self.addresses) > 1

    def admit(self, command_frame: Any) -> bool:
        """Whether to obey this message (False: it is stale; answer STALE). A REDIRECT is advice, always read."""
        raw = bytes(command_frame)
        epoch = frame_epoch(raw)
        if epoch < self.seen and raw[:1] != _REDIRECT:
            self.stale += 1
            return False
        self.seen = max(self.seen, epoch)
        if raw[:1] != _REDIRECT:
            self._unserved_since = None  # served
        return True

    def stale_reply(self) -> c.Stale:
        return c.Stale(self.seen)

    def redirected(self, body: c.Redirect, now: float) -> None:
        """A passive dispatcher refused us: go to the active it names, or ask it again shortly."""
        self.redirects += 1
        self.seen = max(self.seen, body.epoch)
        if body.active and self.several:
            if body.active in self.addresses:
                target = self.addresses.index(body.active)
            else:  # named another way than we know it (0.0.0.0, a host name): the next one of ours
                target = (self.index + 1) % len(self.addresses)
            self._due = (now, target)
            self._unserved_since = None
        else:
            if self._unserved_since is None:
                self._unserved_since = now
            if self.several and now - self._unserved_since >= self.settle_s:
                self._due = (now, (self.index + 1) % len(self.addresses))
            else:
                self._due = (now + ASK_AGAIN_S, self.index)

    def due(self, now: float, last_heard: float) -> tuple[str, bool] | None:
        """(address, new) if it is time to talk to an address again: `new` means another one (reconnect),
        else the same one is asked again. None: carry on."""
        if self._due is not None:
            at, target = self._due
            if now < at:
                return None
            self._due = None
            return self._go(target, now)
        if self.several and now - max(last_heard, self._since) >= self.settle_s:
            return self._go((self.index + 1) % len(self.addresses), now)
        return None

    def reconnect(self, now: float) -> str:
        """The address a worker connects to next, its connection over: the one a REDIRECT named (or the
        same, asked again), else the next one."""
        if self._due is not None:
            target = self._due[1]
            self._due = None
        else:
            target = (self.index + 1) % len(self.addresses)
        return self._go(target, now)[0]

    def started(self, now: float) -> None:
        self._since = now

    def _go(self, target: int, now: float) -> tuple[str, bool]:
        new = target != self.index
        if new:
            self.switches += 1
            self._unserved_since = None
        self.index = target
        self._since = now
        return self.current, new
