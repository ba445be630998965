"""Tier-1 tests of the standby pair's election and fencing (conveyor/dispatcher/standby.py): events in,
actions out.

No sockets, threads or sleeps: every event gets the current time. The second half is a hypothesis state
machine that plays a primary, a backup, an optional witness and a client over a lossy, reordering
network with cuts, crashes and pauses, and checks the invariants after every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from conveyor.dispatcher.standby import (
    BACKUP,
    MAX_DRIFT,
    PRIMARY,
    Action,
    Activate,
    AskLease,
    ClientSeen,
    Event,
    JournalAt,
    LeaseGranted,
    LeaseRefused,
    PeerBeat,
    PersistEpoch,
    Promote,
    Promoted,
    Redirect,
    Replication,
    SendBeat,
    Serve,
    Stale,
    Standby,
    StandbyConfig,
    StepDown,
    Tick,
    Witness,
    next_epoch,
    pair_timings,
)

HB = 0.5
FAILOVER = 2.0


def of(actions: Sequence[Any], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def beat(
    epoch: int = 0, active: bool = False, seq: int = 0, ref: int = 1, echo: int = 0, promote: bool = False
) -> PeerBeat:
    return PeerBeat(epoch=epoch, active=active, seq=seq, ref=ref, echo=echo, promote=promote)


def active_primary(now: float = 0.0, witness: bool = False) -> tuple[Standby, int]:
    """A primary made active on a fresh pair by a passive backup's beat (no witness)."""
    s = Standby(StandbyConfig(PRIMARY, witness=witness), now)
    out = s.handle(beat(), now)
    assert of(out, Activate) == [Activate(1, behind=False)]
    return s, 1


# --- configuration and epochs --------------------------------------------------------------------------


def test_config_refuses_a_takeover_timeout_shorter_than_a_vote() -> None:
    with pytest.raises(ValueError, match="failover_timeout_s"):
        StandbyConfig(PRIMARY, lease_s=1.5, failover_timeout_s=1.5)
    with pytest.raises(ValueError, match="role"):
        StandbyConfig("leader")
    with pytest.raises(ValueError, match="lease_s"):
        StandbyConfig(PRIMARY, heartbeat_s=0.5, lease_s=0.9)


def test_epochs_have_the_parity_of_the_role_so_two_never_share_one() -> None:
    assert [next_epoch(n, PRIMARY) for n in range(5)] == [1, 3, 3, 5, 5]
    assert [next_epoch(n, BACKUP) for n in range(5)] == [2, 2, 4, 4, 6]


# --- no witness: Binary Star with epochs -------------------------------------------------------------------


def test_a_dispatcher_starts_passive_and_redirects_clients() -> None:
    s = Standby(StandbyConfig(BACKUP), 0.0)
    out = s.handle(ClientSeen(), 0.1)
    assert of(out, Redirect) == [Redirect(0)] and not of(out, Serve) and not s.active


def test_on_a_fresh_pair_the_primary_leads_and_persists_its_epoch_before_activating() -> None:
    p = Standby(StandbyConfig(PRIMARY), 0.0)
    out = p.handle(beat(epoch=0, active=False), 0.1)
    assert out.index(PersistEpoch(1)) < out.index(Activate(1, behind=False))
    assert of(p.handle(ClientSeen(), 0.2), Serve) == [Serve(1)]
    b = Standby(StandbyConfig(BACKUP), 0.0)
    assert not of(b.handle(beat(epoch=0, active=False), 0.1), Activate)


def test_the_last_active_leads_after_both_restart_whatever_its_role() -> None:
    b = Standby(StandbyConfig(BACKUP), 0.0, epoch=4)
    assert of(b.handle(beat(epoch=3), 0.1), Activate) == [Activate(6, behind=False)]
    p = Standby(StandbyConfig(PRIMARY), 0.0, epoch=3)
    assert not of(p.handle(beat(epoch=4), 0.1), Activate)


def test_the_backup_takes_over_only_on_a_client_vote_after_the_peer_is_silent_past_the_timeout() -> None:
    b = Standby(StandbyConfig(BACKUP), 0.0)
    b.handle(beat(epoch=1, active=True, seq=7), 0.0)
    b.handle(JournalAt(7), 0.0)
    assert not of(b.handle(Tick(), FAILOVER + 1), Activate)  # silence alone: no vote, stays passive
    assert of(b.handle(ClientSeen(epoch_seen=1), FAILOVER - 0.1), Redirect)  # a vote, but not silent yet
    assert not b.active
    out = b.handle(ClientSeen(epoch_seen=1), FAILOVER)
    assert of(out, Activate) == [Activate(2, behind=False)] and of(out, Serve) == [Serve(2)]


def test_a_takeover_with_a_journal_behind_the_old_active_says_so() -> None:
    b = Standby(StandbyConfig(BACKUP), 0.0)
    b.handle(beat(epoch=1, active=True, seq=9), 0.0)
    b.handle(JournalAt(7), 0.0)
    assert of(b.handle(ClientSeen(), FAILOVER), Activate) == [Activate(2, behind=True)]


def test_a_restarted_dispatcher_waits_a_failover_timeout_before_any_takeover() -> None:
    p = Standby(StandbyConfig(PRIMARY), 10.0, epoch=1)
    assert of(p.handle(ClientSeen(), 11.0), Redirect)
    assert of(p.handle(ClientSeen(), 10.0 + FAILOVER), Activate) == [Activate(3, behind=False)]


def test_an_active_that_hears_of_a_higher_epoch_steps_down_at_once() -> None:
    for event in (beat(epoch=2, active=True), beat(epoch=2), ClientSeen(epoch_seen=2), Stale(2)):
        p, _ = active_primary()
        out = p.handle(event, 1.0)
        assert of(out, StepDown) and not p.active and p.seen == 2, event
        assert not of(p.handle(ClientSeen(), 1.1), Serve)
    p, _ = active_primary()
    assert not of(p.handle(beat(epoch=0, active=True), 1.0), StepDown)  # a lower epoch: the peer steps down


# --- promotion by an operator (conveyor dispatcher promote) ---------------------------------------------


def test_a_promoted_backup_asks_the_active_to_yield_then_leads_whatever_the_epochs() -> None:
    p, epoch = active_primary()
    p.handle(JournalAt(5), 0.1)
    b = Standby(StandbyConfig(BACKUP), 0.0)
    b.handle(beat(epoch=epoch, active=True, seq=5), 0.2)
    b.handle(JournalAt(5), 0.2)  # in sync with the active
    out = b.handle(Promote(), 0.3)
    assert of(out, Promoted) == [Promoted(True, "asked the active to yield")] and not b.active
    [ask] = of(out, SendBeat)  # at once, not at the next heartbeat
    assert ask.promote and not ask.active
    # The active hears it; the backup holds its journal: it steps down at once.
    down = p.handle(beat(epoch=0, active=False, seq=ask.seq, promote=True), 0.35)
    assert of(down, StepDown) and "promoted" in of(down, StepDown)[0].reason and not p.active
    # It restarts passive (its epoch 1 is above the backup's 0, so it would lead a fresh pair): the promoted
    # backup leads instead, and activates in an epoch above every one it heard of.
    again = Standby(StandbyConfig(PRIMARY), 0.5, epoch=epoch)
    assert not of(again.handle(beat(epoch=0, active=False, promote=True), 0.6), Activate)
    up = b.handle(beat(epoch=epoch, active=False), 0.7)
    assert of(up, Activate) == [Activate(2, behind=False)] and b.active
    beats = of(b.handle(Tick(), 0.7 + HB), SendBeat)
    assert beats and not beats[0].promote  # active: it asks nobody to yield any more
    assert of(again.handle(beat(epoch=2, active=True), 0.9), Activate) == [] and again.seen == 2


def test_a_promotion_is_refused_while_the_journal_is_behind_unless_forced() -> None:
    b = Standby(StandbyConfig(BACKUP), 0.0)
    b.handle(beat(epoch=1, active=True, seq=9), 0.1)
    b.handle(JournalAt(7), 0.1)
    [refused] = of(b.handle(Promote(), 0.2), Promoted)
    assert not refused.ok and "behind" in refused.message and "7 of 9" in refused.message
    assert not b.promoting(0.2)
    [forced] = of(b.handle(Promote(force=True), 0.3), Promoted)
    assert forced.ok and b.promoting(0.3)


def test_the_active_yields_once_the_promoted_peer_caught_up_or_after_a_failover_timeout() -> None:
    p, _ = active_primary()
    p.handle(JournalAt(10), 0.1)
    assert not of(p.handle(beat(seq=8, promote=True), 0.2), StepDown)  # two batches still on their way
    assert not of(p.handle(beat(seq=9, promote=True), 0.5), StepDown)
    assert of(p.handle(beat(seq=10, promote=True), 0.6), StepDown)
    q, _ = active_primary()
    q.handle(JournalAt(10), 0.1)
    q.handle(beat(seq=8, promote=True), 0.2)
    [down] = of(q.handle(beat(seq=8, promote=True), 0.2 + FAILOVER), StepDown)
    assert "may run again" in down.reason


def test_a_promoted_dispatcher_whose_peer_is_silent_takes_over_at_once_without_a_witness() -> None:
    b = Standby(StandbyConfig(BACKUP), 0.0)
    b.handle(beat(epoch=1, active=True, seq=3), 0.0)
    b.handle(JournalAt(3), 0.0)
    out = b.handle(Promote(), FAILOVER + 0.1)
    assert of(out, Activate) == [Activate(2, behind=False)] and of(out, Promoted)[0].ok


def test_with_a_witness_a_promoted_backup_activates_only_with_the_witness_lease() -> None:
    b = Standby(StandbyConfig(BACKUP, witness=True), 0.0)
    b.handle(beat(epoch=1, active=True, seq=3), 0.0)
    b.handle(JournalAt(3), 0.0)
    b.handle(Promote(), 0.1)
    asks = of(b.handle(beat(epoch=1, active=False, seq=3), 2.0), AskLease)  # the old active yielded
    assert [a.epoch for a in asks] == [2] and not b.active
    assert not of(b.handle(LeaseRefused(highest=1), 2.05), Activate)  # its lease at the witness is live
    [ask] = of(b.handle(Tick(), 2.0 + HB), AskLease)
    out = b.handle(LeaseGranted(ask.epoch, ask.ref), 2.0 + HB + 0.01)
    assert of(out, Activate) == [Activate(2, behind=False)] and b.serving(2.0 + HB + 0.02)


def test_without_a_witness_an_active_never_steps_down_by_itself() -> None:
    p, epoch = active_primary()
    for t in (1.0, 5.0, 50.0):
        assert not of(p.handle(Tick(), t), StepDown)
    assert of(p.handle(ClientSeen(epoch_seen=epoch), 50.0), Serve) == [Serve(epoch)]


def test_replication_is_in_sync_once_the_backup_caught_up_and_degraded_when_it_is_silent() -> None:
    p = Standby(StandbyConfig(PRIMARY), 0.0)
    p.handle(JournalAt(5), 0.0)
    out = p.handle(beat(seq=3), 0.1)  # activates with a backup behind it: degraded
    assert of(out, Activate) and of(out, Replication) == [Replication(False)]
    assert of(p.handle(beat(seq=5), 0.2), Replication) == [Replication(True)]
    p.handle(JournalAt(9), 0.3)
    assert not of(p.handle(beat(seq=6), 0.4), Replication)  # streaming: lagging a little is in sync
    assert of(p.handle(Tick(), 0.41 + p.config.peer_timeout_s), Replication) == [Replication(False)]
    assert not of(p.handle(beat(seq=6), 2.0), Replication)  # back, but behind: still degraded
    assert of(p.handle(beat(seq=9), 2.1), Replication) == [Replication(True)]
    assert of(p.handle(beat(epoch=0, active=True, seq=9), 2.2), Replication) == [Replication(False)]


def test_heartbeats_go_out_every_interval_carrying_the_epoch() -> None:
    p, epoch = active_primary()
    beats = of(p.handle(Tick(), 0.0 + HB), SendBeat)
    assert [(b.epoch, b.active) for b in beats] == [(epoch, True)]
    assert not of(p.handle(Tick(), HB + 0.1), SendBeat)


# --- witness mode: 2 of 3 ---------------------------------------------------------------------------------


def test_with_a_witness_the_takeover_needs_its_lease() -> None:
    b = Standby(StandbyConfig(BACKUP, witness=True), 0.0)
    b.handle(beat(epoch=1, active=True, ref=1), 0.0)
    asks = of(b.handle(Tick(), FAILOVER), AskLease)
    assert [a.epoch for a in asks] == [2]
    assert of(b.handle(ClientSeen(), FAILOVER), Redirect)  # a client's vote does not count here
    out = b.handle(LeaseGranted(2, asks[0].ref), FAILOVER + 0.01)
    assert of(out, Activate) == [Activate(2, behind=False)] and b.serving(FAILOVER + 0.01)


def test_a_refusal_teaches_the_witness_highest_epoch() -> None:
    b = Standby(StandbyConfig(BACKUP, witness=True), 0.0)
    b.handle(Tick(), FAILOVER)
    b.handle(LeaseRefused(5), FAILOVER)
    # Epoch 5 is news: its holder was alive lately, so the takeover waits for another timeout.
    assert not of(b.handle(Tick(), FAILOVER + HB), AskLease)
    (ask,) = of(b.handle(Tick(), 2 * FAILOVER), AskLease)
    assert ask.epoch == 6


def test_with_a_witness_an_active_steps_down_when_no_vote_is_renewed() -> None:
    p = Standby(StandbyConfig(PRIMARY, witness=True), 0.0)
    sent = of(p.handle(Tick(), 0.0), SendBeat)[0]
    # The backup, passive, echoes our beat: its vote, counted from when we sent that beat.
    out = p.handle(beat(ref=1, echo=sent.ref), 0.1)
    assert of(out, Activate) == [Activate(1, behind=False)]  # it leads, and gave no vote of its own
    assert p.serving(1.4) and not p.serving(p.config.lease_s)
    assert of(p.handle(Tick(), p.config.lease_s), StepDown)
    assert of(p.handle(ClientSeen(), p.config.lease_s), Redirect)


def test_a_grant_that_arrives_after_the_lease_it_gives_would_have_ended_does_not_activate() -> None:
    p = Standby(StandbyConfig(PRIMARY, witness=True), 0.0)
    (ask,) = of(p.handle(beat(epoch=0), 0.1), AskLease)  # leads, no vote yet: asks the witness
    late = 0.1 + p.config.lease_s
    assert not of(p.handle(LeaseGranted(ask.epoch, ask.ref), late), Activate)
    assert not p.serving(late)


def test_a_leader_keeps_its_lease_request_while_the_peer_keeps_beating() -> None:
    p = Standby(StandbyConfig(PRIMARY, witness=True), 0.0)
    (ask,) = of(p.handle(beat(epoch=0, ref=1), 0.1), AskLease)
    p.handle(beat(epoch=0, ref=2), 0.2)  # the backup does not hear us, so gives no vote, but beats
    assert of(p.handle(LeaseGranted(ask.epoch, ask.ref), 0.25), Activate) == [Activate(1, behind=False)]


def test_a_passive_votes_by_echo_and_then_keeps_its_vote_longer_than_the_holder_counts() -> None:
    b = Standby(StandbyConfig(BACKUP, witness=True), 0.0)
    (sent,) = of(b.handle(beat(epoch=1, active=True, ref=41), 0.0), SendBeat)
    assert sent.echo == 41 and b.voted_until > b.config.lease_s
    b.handle(beat(epoch=1, active=True, ref=42), 0.2)
    (sent,) = of(b.handle(Tick(), HB), SendBeat)
    assert sent.echo == 42 and b.voted_until > HB + b.config.lease_s
    # No vote for a peer in a lower epoch than one we know of.
    b.handle(Stale(3), 0.6)
    b.handle(beat(epoch=1, active=True, ref=43), 0.7)
    (sent,) = of(b.handle(Tick(), 2 * HB), SendBeat)
    assert sent.echo == 0


def test_the_witness_grants_one_holder_at_a_time_and_never_a_lower_epoch() -> None:
    w = Witness(lease_s=1.5, now=-10.0)
    assert w.handle("p", AskLease(1, ref=1), 0.0) == [PersistEpoch(1), LeaseGranted(1, 1)]
    assert w.handle("b", AskLease(2, ref=1), 1.0) == [LeaseRefused(1)]
    assert w.handle("p", AskLease(1, ref=2), 1.0) == [LeaseGranted(1, 2)]
    assert w.handle("b", AskLease(2, ref=2), 2.6) == [PersistEpoch(2), LeaseGranted(2, 2)]
    assert w.handle("p", AskLease(1, ref=3), 5.0) == [LeaseRefused(2)]


def test_a_restarted_witness_grants_nothing_for_a_lease_since_it_forgot_its_holder() -> None:
    w = Witness(lease_s=1.5, now=0.0, highest=3)
    assert w.handle("b", AskLease(4, ref=1), 1.0) == [LeaseRefused(3)]
    assert w.handle("b", AskLease(4, ref=2), 1.6) == [PersistEpoch(4), LeaseGranted(4, 2)]


# --- the hypothesis model ---------------------------------------------------------------------------------

NODES = ("p", "b")
PEER = {"p": "b", "b": "p"}


@dataclass
class Msg:
    src: str
    dst: str
    body: Any


class PairMachine(RuleBasedStateMachine):
    """Two dispatchers, maybe a witness, one client; each host's clock has its own offset."""

    @initialize(
        witness=st.booleans(),
        offsets=st.tuples(*[st.floats(-100, 100)] * 3),
        rates=st.tuples(*[st.floats(1.0, 1 + MAX_DRIFT)] * 3),  # any two differ by at most MAX_DRIFT
    )
    def start(
        self, witness: bool, offsets: tuple[float, float, float], rates: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ) -> None:
        self.witness = witness
        self.t = 0.0
        # Each host's clock: its own origin, and a rate within the drift the design allows.
        self.offset = {"p": offsets[0], "b": offsets[1], "w": offsets[2]}
        self.rate = {"p": rates[0], "b": rates[1], "w": rates[2]}
        self.persisted = {"p": 0, "b": 0}
        self.config = {n: StandbyConfig(PRIMARY if n == "p" else BACKUP, witness=witness) for n in NODES}
        self.nodes: dict[str, Standby | None] = {n: Standby(self.config[n], self.now(n)) for n in NODES}
        self.w_highest = 0
        self.w: Witness | None = Witness(self.config["p"].lease_s, self.now("w"))
        self.net: list[Msg] = []
        self.cut: set[frozenset[str]] = set()
        self.client_epoch = 0
        self.activated: dict[int, str] = {}  # epoch -> the node that activated in it
        self.epochs = {n: 0 for n in NODES}
        self.seen = {n: 0 for n in NODES}

    def now(self, node: str) -> float:
        return self.t * self.rate[node] + self.offset[node]

    def send(self, src: str, dst: str, body: Any) -> None:
        if frozenset((src, dst)) not in self.cut:
            self.net.append(Msg(src, dst, body))

    def feed(self, name: str, event: Event) -> None:
        node = self.nodes[name]
        if node is None:
            return
        was_active = node.active
        before = (node.peer_at, node.voted_until, node.peer_active, node.promoting(self.now(name)))
        now = self.now(name)
        actions: list[Action] = node.handle(event, now)
        for action in actions:
            if isinstance(action, SendBeat):
                self.send(name, PEER[name], action)
            elif isinstance(action, AskLease) and self.witness:
                self.send(name, "w", action)
            elif isinstance(action, PersistEpoch):
                self.persisted[name] = action.epoch
            elif isinstance(action, Activate):
                self.check_activation(name, node, event, action, now, before, was_active)
            elif isinstance(action, Serve):
                assert node.active and node.serving(now) and action.epoch == node.epoch, "a passive served"
                if action.epoch < self.client_epoch:
                    self.feed(name, Stale(self.client_epoch))  # the client refuses a stale dispatcher
                else:
                    self.client_epoch = action.epoch
        assert node.epoch >= self.epochs[name] and node.seen >= self.seen[name], "an epoch went down"
        self.epochs[name], self.seen[name] = node.epoch, node.seen

    def check_activation(
        self,
        name: str,
        node: Standby,
        event: Event,
        action: Activate,
        now: float,
        before: tuple[float | None, float, bool, bool],
        was_active: bool,
    ) -> None:
        assert not was_active
        assert self.persisted[name] == action.epoch, "activated before persisting its epoch"
        assert self.activated.setdefault(action.epoch, name) == name, "two actives in one epoch"
        peer_at, voted_until, peer_active, promoted = before
        assert now >= voted_until, "activated while its vote for the peer was live"
        cfg = node.config
        silent = now - (node._started_at if peer_at is None else peer_at) >= cfg.failover_timeout_s
        leads = (isinstance(event, PeerBeat) and not event.active) or (peer_at is not None and not peer_active)
        # A takeover needs the peer silent past the timeout, unless the peer was last heard passive.
        assert silent or leads, "a takeover while the peer was heard active"
        if cfg.witness:
            assert node.serving(now), "activated in witness mode without a lease"
        elif not leads:  # an operator's promotion is a vote too
            assert isinstance(event, ClientSeen | Promote) or promoted, "a takeover without a client's vote"

    @rule(dt=st.sampled_from([0.01, 0.1, 0.3, 0.5, 1.0, 2.5]))
    def advance(self, dt: float) -> None:
        self.t += dt

    @rule(name=st.sampled_from(NODES))
    def tick(self, name: str) -> None:
        self.feed(name, Tick())

    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        if not self.net:
            return
        self.deliver_one(self.net.pop(data.draw(st.integers(0, len(self.net) - 1))))

    def deliver_one(self, msg: Msg) -> None:
        body = msg.body
        if msg.dst == "w":
            if self.w is None:
                return
            for answer in self.w.handle(msg.src, body, self.now("w")):
                if isinstance(answer, PersistEpoch):
                    self.w_highest = answer.epoch
                else:
                    self.send("w", msg.src, answer)
        elif isinstance(body, SendBeat):
            self.feed(msg.dst, PeerBeat(body.epoch, body.active, body.seq, body.ref, body.echo, body.promote))
        else:
            self.feed(msg.dst, body)

    @rule(dt=st.sampled_from([0.1, 0.25, 0.5]), steps=st.integers(1, 8))
    def run_a_while(self, dt: float, steps: int) -> None:
        """Time passes with every host ticking and every message through (except over cut links)."""
        for _ in range(steps):
            self.t += dt
            for name in NODES:
                self.feed(name, Tick())
            while self.net:
                self.deliver_one(self.net.pop(0))
            self.at_most_one_serves_with_a_witness()

    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        if self.net:
            self.net.pop(data.draw(st.integers(0, len(self.net) - 1)))

    @rule(name=st.sampled_from(NODES), force=st.booleans())
    def operator_promotes(self, name: str, force: bool) -> None:
        self.feed(name, Promote(force))

    @rule(name=st.sampled_from(NODES))
    def client_asks(self, name: str) -> None:
        self.feed(name, ClientSeen(self.client_epoch))

    @rule(link=st.sampled_from([("p", "b"), ("p", "w"), ("b", "w")]))
    def toggle_link(self, link: tuple[str, str]) -> None:
        self.cut ^= {frozenset(link)}

    @rule(name=st.sampled_from(NODES))
    def crash_or_restart(self, name: str) -> None:
        if self.nodes[name] is None:
            self.nodes[name] = Standby(self.config[name], self.now(name), epoch=self.persisted[name])
            self.seen[name] = self.persisted[name]  # only the epoch is persisted; what it heard of is not
        else:
            self.nodes[name] = None
            self.net = [m for m in self.net if m.dst != name]

    @rule()
    def crash_or_restart_the_witness(self) -> None:
        if self.w is None:
            self.w = Witness(self.config["p"].lease_s, self.now("w"), highest=self.w_highest)
        else:
            self.w = None
            self.net = [m for m in self.net if m.dst != "w"]

    @rule(name=st.sampled_from(NODES), seq=st.integers(0, 20))
    def journal(self, name: str, seq: int) -> None:
        self.feed(name, JournalAt(seq))

    @invariant()
    def at_most_one_serves_with_a_witness(self) -> None:
        if not self.witness:
            return
        serving = [n for n, s in self.nodes.items() if s is not None and s.serving(self.now(n))]
        assert len(serving) <= 1, f"two serve at once: {serving}"


PairMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_pair = PairMachine.TestCase


# --- scenarios played through the model, step by step ------------------------------------------------------


def play(witness: bool, *steps: tuple[str, Any]) -> PairMachine:
    m = PairMachine()
    m.start(witness=witness, offsets=(3.0, -7.0, 11.0))
    for name, arg in steps:
        if name == "run":
            m.run_a_while(0.1, arg)
        else:
            getattr(m, name)(arg)
        m.at_most_one_serves_with_a_witness()
    return m


def actives(m: PairMachine) -> list[str]:
    return [n for n, s in m.nodes.items() if s is not None and s.serving(m.now(n))]


def test_scenario_witness_split_of_the_pair_link_keeps_one_active_then_fails_over_when_it_dies() -> None:
    m = play(True, ("run", 30))
    assert actives(m) == ["p"]
    m = play(True, ("run", 30), ("toggle_link", ("p", "b")), ("run", 60))
    assert actives(m) == ["p"]  # the backup asks, the witness refuses while the primary renews
    p = m.nodes["p"]
    assert p is not None and p.in_sync is False  # degraded
    m.crash_or_restart("p")
    m.run_a_while(0.1, 50)
    assert actives(m) == ["b"]
    b = m.nodes["b"]
    assert b is not None and b.epoch == 2


def test_scenario_witness_the_active_cut_off_from_everything_steps_down_before_the_backup_takes_over() -> None:
    m = play(True, ("run", 30), ("toggle_link", ("p", "b")), ("toggle_link", ("p", "w")), ("run", 60))
    assert actives(m) == ["b"]
    p = m.nodes["p"]
    assert p is not None and not p.active
    m.toggle_link(("p", "b"))
    m.toggle_link(("p", "w"))
    m.run_a_while(0.1, 30)
    assert actives(m) == ["b"] and p.seen == 2 and not p.active  # it came back passive: no fail-back


def test_scenario_no_witness_a_split_with_a_client_on_each_side_gives_two_actives_then_one_on_healing() -> None:
    m = play(False, ("run", 30))
    assert actives(m) == ["p"]
    m.toggle_link(("p", "b"))
    m.run_a_while(0.1, 30)
    m.client_epoch = 0  # a client that has only ever seen the backup's side
    m.client_asks("b")
    assert sorted(actives(m)) == ["b", "p"]
    m.toggle_link(("p", "b"))
    m.run_a_while(0.1, 10)
    assert actives(m) == ["b"]


def test_scenario_witness_a_witness_restart_during_a_split_of_the_pair_link_hands_no_second_lease() -> None:
    m = play(True, ("run", 30), ("toggle_link", ("p", "b")), ("run", 30))
    assert actives(m) == ["p"]
    m.crash_or_restart_the_witness()
    m.crash_or_restart_the_witness()
    m.run_a_while(0.1, 40)  # every step checks that at most one serves
    # The restarted witness renewed nobody for a lease: the primary stepped down, and whoever asked first
    # after that got it. A failover, not two actives.
    assert len(actives(m)) == 1


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0.01, max_value=3600, allow_nan=False), st.sampled_from([PRIMARY, BACKUP]),
       st.booleans())
def test_every_positive_failover_timeout_gives_a_valid_config(timeout_s: float, role: str, witness: bool) -> None:
    """`--failover-timeout` alone sets the pair's timeouts (and the witness's lease): any positive value
    gives timeouts that pass every check of StandbyConfig, the failover timeout itself unchanged."""
    config = StandbyConfig.for_failover(role, timeout_s, witness=witness)
    assert config.failover_timeout_s == timeout_s and config.lease_s == pair_timings(timeout_s)[2]
    assert config.heartbeat_s <= 0.5


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan")])
def test_a_failover_timeout_that_is_not_positive_is_refused(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="--failover-timeout must be a positive number"):
        pair_timings(timeout_s)
