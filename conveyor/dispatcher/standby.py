"""The standby pair's election and fencing state machine (issue 17, step 1). No I/O.

`Standby.handle(event, now) -> list[Action]` decides, for one dispatcher of a primary/backup pair, whether
it is active or passive, with which epoch, and what it must send: heartbeats to its peer, lease requests
to the optional witness, answers to clients and workers. `Witness.handle` is the witness's side. Time is
passed in (a monotonic clock of the caller's host: only differences of one host's clock are compared,
never clocks of two hosts). Nothing here opens a socket, a thread or the journal; docs/standby.md is
the design.

States (one dispatcher)::

      start --> PASSIVE ----------------------------------------------------> ACTIVE(epoch E)
                  ^      (a) fresh pair / both back: the peer is heard          |  E new, with the
                  |          passive and we lead: (epoch, primary) larger        |  role's parity,
                  |      (b) takeover: peer silent >= failover_timeout_s,        |  persisted first
                  |          no news of a higher epoch for as long, our vote     |
                  |          for the peer expired, and the vote of                |
                  |          - no witness: a client or worker asking us,          |
                  |          - witness: the witness's lease (or, in (a), the     |
                  |            peer's echo)                                       |
                  +-------------------------------------------------------------+
                         a higher epoch heard of (peer, client, worker, STALE, witness);
                         witness mode: no live lease from the peer or the witness

Rules worth knowing before reading:
- Epochs. An activation always takes a new epoch: the smallest number above every epoch this
  dispatcher has seen with the parity of its role (primary odd, backup even), so two dispatchers can
  never be active in the same epoch, witness or not. It is persisted (PersistEpoch) before Activate.
  Every epoch heard of (a peer's beat, a client's or worker's highest, a STALE answer, the witness)
  raises `seen`; an active dispatcher that hears of a higher one steps down at once.
- Votes are leases. A passive dispatcher votes for its peer by echoing the number of the peer's last
  heartbeat; the witness grants a lease for one epoch to one dispatcher at a time. A lease is counted
  by its holder from when it *sent* the request (so it ends early), and kept by the voter from when it
  *received* it, stretched by MAX_DRIFT (so it ends late): a voter never votes twice at one instant.
- Witness mode (2 of 3: the two dispatchers and the witness): a dispatcher serves only while it holds
  a lease from its peer or from the witness, and steps down as soon as it holds neither. It takes over
  only when its peer has been silent for failover_timeout_s, its own vote has expired, and the witness
  granted it the lease. So at most one serves at any instant.
- No witness (Binary Star): the backup takes over when its peer has been silent for failover_timeout_s,
  its vote to the peer has expired, and a client or worker asks it for service (the client's vote). An
  active without a witness never steps down by itself: if the link between the two is cut while peers
  reach both, both are active, in different epochs; a peer that has seen both obeys only the higher,
  and when the link heals the lower steps down and hands over what it has. News of a higher epoch
  defers a takeover by a failover timeout, so clients that reach both make them converge instead of
  taking over from each other in turn.
- Fail-back is never automatic: a restarted dispatcher starts passive, and becomes active only by the
  rules above (on a fresh pair, where both are passive, the one that leads activates), or when an
  operator promotes it (`conveyor dispatcher promote`, the Promote event): a passive that has applied
  everything the active announced asks it, in its heartbeats, to yield; the active steps down once the
  passive has caught up with its journal (or after a failover timeout of asking), and the promoted one
  leads, whatever the epochs, and activates in a new epoch (witness mode: once the witness grants it,
  when the old active's lease has ended). A passive whose peer is silent is promoted as a takeover.
- Replication: the active is in sync (Replication(True): ACCEPTED waits for the peer's copy) while a
  passive peer has been heard within peer_timeout_s and has applied everything it committed; it is
  degraded (Replication(False)) otherwise. A passive that activates with less than its old active
  announced says so (Activate.behind).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

PRIMARY = "primary"
BACKUP = "backup"
ROLES = (PRIMARY, BACKUP)

MAX_DRIFT = 0.01  # the fastest rate at which two hosts' monotonic clocks may drift apart (1 %)
KEPT_BEATS = 64  # send times of our last heartbeats kept, to count a vote that echoes one

# --- events -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """The timer the loop armed (ArmTimer) fired, or any turn of the loop: timeouts are checked."""


@dataclass(frozen=True, slots=True)
class PeerBeat:
    """A heartbeat from the other dispatcher: its epoch, whether it is active, its journal's sequence number
    (committed if active, applied if passive), its heartbeat number `ref`, and `echo`: the number of our
    last heartbeat it received, as a vote for us (0: no vote)."""

    epoch: int
    active: bool
    seq: int
    ref: int
    echo: int = 0
    promote: bool = False  # the peer was promoted: it asks us, if active, to yield


@dataclass(frozen=True, slots=True)
class Promote:
    """An operator asks this dispatcher to become the active one (`conveyor dispatcher promote`). `force`:
    even with a journal behind the active's (jobs acknowledged only there come back when it rejoins)."""

    force: bool = False


@dataclass(frozen=True, slots=True)
class ClientSeen:
    """A client or worker asked this dispatcher for service (HELLO, READY, SUBMIT...): a vote in Binary
    Star's sense. `epoch_seen` is the highest dispatcher epoch that peer has obeyed."""

    epoch_seen: int = 0


@dataclass(frozen=True, slots=True)
class Stale:
    """A client or worker refused one of our messages as stale: it has obeyed this higher epoch."""

    epoch: int


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    """The witness granted the lease for `epoch`, answering our AskLease numbered `ref`."""

    epoch: int
    ref: int


@dataclass(frozen=True, slots=True)
class LeaseRefused:
    """The witness refused: another holds a live lease, or `highest` (the highest epoch it granted) is
    not below the epoch asked."""

    highest: int


@dataclass(frozen=True, slots=True)
class JournalAt:
    """Our journal holds everything up to `seq`: committed (active) or applied from the stream (passive)."""

    seq: int


Event: TypeAlias = Tick | PeerBeat | Promote | ClientSeen | Stale | LeaseGranted | LeaseRefused | JournalAt

# --- actions ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendBeat:
    """Send a heartbeat to the other dispatcher (its fields as in PeerBeat)."""

    epoch: int
    active: bool
    seq: int
    ref: int
    echo: int
    promote: bool = False


@dataclass(frozen=True, slots=True)
class Promoted:
    """The answer to Promote: `ok` (already active, promoting, or activated) or refused, and why."""

    ok: bool
    message: str


@dataclass(frozen=True, slots=True)
class AskLease:
    """Ask the witness for (or to renew) the lease for `epoch`; its answer carries `ref` back."""

    epoch: int
    ref: int


@dataclass(frozen=True, slots=True)
class PersistEpoch:
    """Write `epoch` into the journal (meta) and commit, before anything else carries it."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Activate:
    """Start accepting and assigning, every message carrying `epoch`. `behind`: our journal had not applied
    everything the old active announced (jobs acknowledged only there come back when it rejoins)."""

    epoch: int
    behind: bool


@dataclass(frozen=True, slots=True)
class StepDown:
    """Stop accepting and assigning now; become passive. `seen`: the highest epoch known. What only our
    journal holds is then shipped to the active when one is heard (the merge, a later step)."""

    seen: int
    reason: str


@dataclass(frozen=True, slots=True)
class Serve:
    """Answer the client or worker that asked (ClientSeen): we are active in `epoch`."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Redirect:
    """Refuse the client or worker that asked: we are passive; `seen` is the highest epoch we know, so a
    peer that obeys a lower one learns it is stale."""

    seen: int


@dataclass(frozen=True, slots=True)
class Replication:
    """Active only: `in_sync` True means ACCEPTED waits for the peer's copy; False means degraded."""

    in_sync: bool


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """Deliver a Tick at `at` (our clock), replacing the timer armed before."""

    at: float


Action: TypeAlias = (
    SendBeat | Promoted | AskLease | PersistEpoch | Activate | StepDown | Serve | Redirect | Replication | ArmTimer
)


@dataclass(frozen=True, slots=True)
class StandbyConfig:
    """One dispatcher's place in the pair and its timeouts, in seconds."""

    role: str  # PRIMARY or BACKUP: the parity of its epochs, and who leads a fresh pair
    witness: bool = False  # a witness takes part: activation needs a lease (2 of 3)
    heartbeat_s: float = 0.5
    peer_timeout_s: float = 1.0  # the passive peer silent this long: degraded replication
    failover_timeout_s: float = 2.0  # the peer silent this long: a takeover may start
    lease_s: float = 1.5  # a vote's or the witness's lease, as counted by its holder

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be {PRIMARY!r} or {BACKUP!r}, not {self.role!r}")
        if not 0 < self.heartbeat_s < self.peer_timeout_s:
            raise ValueError("heartbeat_s must be positive and below peer_timeout_s")
        if self.lease_s <= 2 * self.heartbeat_s:
            raise ValueError("lease_s must exceed two heartbeats, so a lease is renewed before it ends")
        # A voter waits for its own vote to end before a takeover; the takeover timeout must cover it.
        if self.failover_timeout_s < self.lease_s * (1 + MAX_DRIFT):
            raise ValueError("failover_timeout_s must be at least lease_s * (1 + MAX_DRIFT)")

    @classmethod
    def for_failover(cls, role: str, failover_timeout_s: float, witness: bool = False) -> StandbyConfig:
        """The configuration `--failover-timeout` gives: every other timeout follows from it."""
        heartbeat_s, peer_timeout_s, lease_s = pair_timings(failover_timeout_s)
        return cls(role, witness=witness, heartbeat_s=heartbeat_s, peer_timeout_s=peer_timeout_s,
                   failover_timeout_s=failover_timeout_s, lease_s=lease_s)


def pair_timings(failover_timeout_s: float) -> tuple[float, float, float]:
    """(heartbeat, peer timeout, lease) in seconds for a failover timeout: the pair's and the witness's.
    ValueError unless it is positive."""
    if not failover_timeout_s > 0:
        raise ValueError("--failover-timeout must be a positive number of seconds")
    heartbeat_s = min(0.5, failover_timeout_s / 4)
    return heartbeat_s, 2 * heartbeat_s, min(3 * heartbeat_s, failover_timeout_s / 1.02)


def next_epoch(above: int, role: str) -> int:
    """The smallest epoch above `above` with the role's parity: primary odd, backup even."""
    parity = 1 if role == PRIMARY else 0
    epoch = above + 1
    return epoch if epoch % 2 == parity else epoch + 1


class Standby:
    def __init__(self, config: StandbyConfig, now: float, epoch: int = 0):
        """`epoch`: the one persisted in our journal (0: never active). A dispatcher always starts passive."""
        self.config = config
        self.active = False
        self.epoch = epoch  # the epoch of our last activation
        self.seen = epoch  # the highest epoch heard of anywhere
        self.seq = 0  # our journal: committed (active) or applied (passive)
        self.peer_seq = 0  # the peer's last announced sequence number
        self.active_seq = 0  # the last sequence number announced by the peer while active
        self.peer_active = False
        self.peer_epoch = 0
        self.in_sync: bool | None = None  # active only: as last told (Replication)
        # Silence counts from our start: a dispatcher that just started has not heard its peer yet.
        self.peer_at: float | None = None  # when we last heard the peer
        self._started_at = now
        self._news_at = -float("inf")  # when we last learned of a higher epoch
        self.peer_ref = 0  # the number of the peer's last heartbeat we received
        self.lease_until = -float("inf")  # votes held (from the peer or the witness), our clock
        self.voted_until = -float("inf")  # our vote for the peer, kept until then (our clock)
        self._ref = 0  # our heartbeats' and lease requests' numbers
        self._sent_at: dict[int, float] = {}  # ref -> when sent, for the last KEPT_BEATS
        self._asked_epoch = 0  # the epoch our AskLease asked for (witness mode, passive), 0: none
        self._ask_again_at = -float("inf")  # an unanswered AskLease is repeated each heartbeat
        self._next_beat_at = now
        self.promoting_until = -float("inf")  # promoted by an operator: we lead (and ask the active to yield)
        self.peer_promoting = False  # the peer's last beat: it was promoted, so it leads
        self._asked_to_yield_at: float | None = None  # active: when the promoted peer first asked

    # --- queries ---------------------------------------------------------------------------------------

    def serving(self, now: float) -> bool:
        """May we accept and assign at `now`? The socket loop asks this before every message it sends."""
        if not self.active:
            return False
        return not self.config.witness or now < self.lease_until

    def peer_silent(self, now: float) -> bool:
        since = max(self._started_at, self._news_at, -float("inf") if self.peer_at is None else self.peer_at)
        return now - since >= self.config.failover_timeout_s

    def may_take_over(self, now: float) -> bool:
        """The takeover's preconditions other than the vote: passive, peer silent, our own vote ended."""
        return not self.active and self.peer_silent(now) and now >= self.voted_until

    # --- events ----------------------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        out: list[Action] = []
        if isinstance(event, PeerBeat):
            self._peer_beat(event, now, out)
        elif isinstance(event, Promote):
            self._promote(event, now, out)
        elif isinstance(event, ClientSeen):
            self._client_seen(event, now, out)
        elif isinstance(event, Stale):
            self._learn(event.epoch, "a peer refused us as stale", now, out)
        elif isinstance(event, LeaseGranted):
            self._lease_granted(event, now, out)
        elif isinstance(event, LeaseRefused):
            self._learn(event.highest, "the witness knows a higher epoch", now, out)
        elif isinstance(event, JournalAt):
            self.seq = max(self.seq, event.seq)
        self._check(now, out)
        return out

    def _peer_beat(self, beat: PeerBeat, now: float, out: list[Action]) -> None:
        self.peer_at = now
        self.peer_ref = beat.ref
        self.peer_active = beat.active
        self.peer_epoch = beat.epoch
        self.peer_seq = beat.seq
        self.peer_promoting = beat.promote and not beat.active
        if beat.active:
            self.active_seq = max(self.active_seq, beat.seq)
        self._learn(beat.epoch, "the peer has a higher epoch", now, out)
        if self.active and self.peer_promoting:
            self._yield(now, out)
        elif self.active:
            self._asked_to_yield_at = None
        if not self._leads(now):
            self._asked_epoch = 0  # the peer speaks: no takeover is under way
        if self.config.witness and beat.echo in self._sent_at:
            self.lease_until = max(self.lease_until, self._sent_at[beat.echo] + self.config.lease_s)
        if not self.active and self._leads(now) and now >= self.voted_until:
            self._try_activate(now, out)

    def _promote(self, asked: Promote, now: float, out: list[Action]) -> None:
        if self.active:
            out.append(Promoted(True, f"already active in epoch {self.epoch}"))
            return
        peer_heard = self.peer_at is not None and not self.peer_silent(now)
        if peer_heard and self.peer_active and self.seq < self.active_seq and not asked.force:
            out.append(Promoted(False, f"its journal is behind the active's (batch {self.seq} of "
                                       f"{self.active_seq}); wait until it is in sync, or --force"))
            return
        # Lasts two failover timeouts: long enough for the active to yield and the witness to grant.
        self.promoting_until = now + 2 * self.config.failover_timeout_s
        self._asked_epoch = 0
        if not peer_heard and not self.config.witness and self.may_take_over(now):
            self._activate(self._new_epoch(), now, out)  # the operator's word is the vote of a takeover
            out.append(Promoted(True, f"active in epoch {self.epoch} (the peer is silent)"))
            return
        self._next_beat_at = -float("inf")  # tell the active at once
        out.append(Promoted(True, "asked the active to yield" if peer_heard and self.peer_active
                            else "promoted: it activates as soon as the rules allow"))

    def promoting(self, now: float) -> bool:
        return not self.active and now < self.promoting_until

    def _yield(self, now: float, out: list[Action]) -> None:
        """Active, and the promoted peer asks us to yield: once it holds our journal, or after a timeout."""
        if self._asked_to_yield_at is None:
            self._asked_to_yield_at = now
        caught_up = self.peer_seq >= self.seq
        if caught_up or now - self._asked_to_yield_at >= self.config.failover_timeout_s:
            self._asked_to_yield_at = None
            self._step_down("an operator promoted the peer" + ("" if caught_up else
                            " (it had not applied our last batches: those jobs may run again)"), out)

    def _client_seen(self, asked: ClientSeen, now: float, out: list[Action]) -> None:
        self._learn(asked.epoch_seen, "a client or worker obeys a higher epoch", now, out)
        if not self.active and not self.config.witness and self.may_take_over(now):
            self._activate(self._new_epoch(), now, out)  # Binary Star: the client's request is the vote
        if self.serving(now):
            out.append(Serve(self.epoch))
        else:
            out.append(Redirect(self.seen))

    def _lease_granted(self, grant: LeaseGranted, now: float, out: list[Action]) -> None:
        sent_at = self._sent_at.get(grant.ref)
        if sent_at is None or grant.epoch < self.seen:
            return  # an answer too old to count
        # Not raising `seen`: the grant is for our own epoch, which only activation makes ours.
        if self.active and grant.epoch == self.epoch:
            self.lease_until = max(self.lease_until, sent_at + self.config.lease_s)
        elif not self.active and grant.epoch == self._asked_epoch:
            self._asked_epoch = 0
            self.lease_until = max(self.lease_until, sent_at + self.config.lease_s)
            # The peer may have spoken since we asked: then this is no takeover (the grant lapses).
            live = now < self.lease_until  # counted from our request: a late answer may be spent already
            if live and (self.may_take_over(now) or (self._leads(now) and now >= self.voted_until)):
                self._activate(grant.epoch, now, out)

    def _leads(self, now: float) -> bool:
        """A fresh pair, or both back after an outage: both passive, and the one with the larger (epoch,
        primary first) leads. One that has heard of a higher epoch than its own does not: an activation
        happened that it missed, and the peer is the one that knows of it."""
        if self.active or self.peer_at is None or self.peer_active:
            return False
        mine_promoted, peer_promoted = self.promoting(now), self.peer_promoting
        if mine_promoted != peer_promoted:  # an operator's choice decides, whatever the epochs
            return mine_promoted
        mine = (self.epoch, self.config.role == PRIMARY)
        return mine > (self.peer_epoch, self.config.role != PRIMARY) and self.epoch == self.seen

    # --- transitions -----------------------------------------------------------------------------------

    def _learn(self, epoch: int, reason: str, now: float, out: list[Action]) -> None:
        if epoch <= self.seen:
            return
        self.seen = epoch
        # News of a higher epoch is news that its holder was alive lately: no takeover for a timeout.
        # Without this, two dispatchers that cannot reach each other, asked in turn by clients that
        # reach both, would take over from each other forever; with it, those clients converge.
        self._news_at = now
        if self.active:  # an active's epoch is the highest it has seen
            self._step_down(reason, out)

    def _new_epoch(self) -> int:
        return next_epoch(max(self.seen, self.epoch), self.config.role)

    def _try_activate(self, now: float, out: list[Action]) -> None:
        """Activate now, or (witness mode, no live vote) ask the witness first."""
        if not self.config.witness or now < self.lease_until:
            self._activate(self._new_epoch(), now, out)
        elif now >= self._ask_again_at:
            self._asked_epoch = self._new_epoch()
            self._ask_again_at = now + self.config.heartbeat_s
            out.append(AskLease(self._asked_epoch, self._number(now)))

    def _activate(self, epoch: int, now: float, out: list[Action]) -> None:
        # Our own vote for the peer must have ended: it may be serving on it.
        assert now >= self.voted_until, "activation while our vote for the peer is live"
        self.active = True
        self.epoch = self.seen = epoch
        self.promoting_until = -float("inf")
        self._asked_epoch = 0
        self.voted_until = -float("inf")
        self.in_sync = None
        out.append(PersistEpoch(epoch))
        out.append(Activate(epoch, behind=self.seq < self.active_seq))
        self._next_beat_at = -float("inf")  # tell the peer at once

    def _step_down(self, reason: str, out: list[Action]) -> None:
        self.active = False
        self.in_sync = None
        self.lease_until = -float("inf")
        out.append(StepDown(self.seen, reason))

    def _number(self, now: float) -> int:
        self._ref += 1
        self._sent_at[self._ref] = now
        self._sent_at.pop(self._ref - KEPT_BEATS, None)
        return self._ref

    def _check(self, now: float, out: list[Action]) -> None:
        """The timeouts, after every event: lease lapsed, takeover due, replication, the heartbeat."""
        cfg = self.config
        if self.active and cfg.witness and now >= self.lease_until:
            self._step_down("the lease lapsed: neither the peer nor the witness votes for us", out)
        if cfg.witness and (self.may_take_over(now) or (self._leads(now) and now >= self.voted_until)):
            self._try_activate(now, out)
        elif self.promoting(now) and not cfg.witness and (
                self.may_take_over(now) or (self._leads(now) and now >= self.voted_until)):
            self._activate(self._new_epoch(), now, out)  # promoted: the peer yielded, or fell silent
        if self.active:
            heard = self.peer_at is not None and now - self.peer_at < cfg.peer_timeout_s and not self.peer_active
            # In sync while a passive peer is heard, once it has caught up; degraded when it falls silent.
            in_sync = heard and (bool(self.in_sync) or self.peer_seq >= self.seq)
            if in_sync != self.in_sync:
                self.in_sync = in_sync
                out.append(Replication(in_sync))
        if now >= self._next_beat_at:
            self._beat(now, out)
        wake = self._next_beat_at
        if self.active and cfg.witness:
            wake = min(wake, self.lease_until)
        out.append(ArmTimer(wake))

    def _beat(self, now: float, out: list[Action]) -> None:
        cfg = self.config
        ref = self._number(now)
        echo = 0
        # Witness mode: vote for the peer while we are passive, hear it, do not lead and do not take over.
        hearing = self.peer_at is not None and now - self.peer_at < 2 * cfg.heartbeat_s
        voting = (cfg.witness and hearing and not self.active and not self._asked_epoch and not self._leads(now)
                  and not self.promoting(now))
        if voting and self.peer_epoch >= self.seen:
            echo = self.peer_ref
            # Kept from our receipt of its beat, later than its send: it ends later than it believes.
            self.voted_until = max(self.voted_until, now + cfg.lease_s * (1 + MAX_DRIFT))
        out.append(SendBeat(self.epoch, self.active, self.seq, ref, echo, self.promoting(now)))
        if self.active and cfg.witness:
            out.append(AskLease(self.epoch, ref))
        self._next_beat_at = now + cfg.heartbeat_s


class Witness:
    """The third vote: grants one dispatcher at a time the lease for an epoch, never a lower epoch than it
    granted before. It holds no data; it persists only `highest` (PersistEpoch before the grant)."""

    def __init__(self, lease_s: float, now: float, highest: int = 0):
        """`highest`: as persisted. A witness that restarts does not know whom it granted a lease before it
        died, so it grants nothing for a whole lease: any lease it gave has ended by then."""
        self.lease_s = lease_s
        self.highest = highest
        self.holder: str | None = None  # None with a live `until`: unknown (just restarted)
        self.until = now + lease_s * (1 + MAX_DRIFT)  # our clock

    def handle(self, node: str, ask: AskLease, now: float) -> list[PersistEpoch | LeaseGranted | LeaseRefused]:
        if now < self.until and self.holder != node:
            return [LeaseRefused(self.highest)]
        if ask.epoch < self.highest or (ask.epoch == self.highest and self.holder != node):
            return [LeaseRefused(self.highest)]
        out: list[PersistEpoch | LeaseGranted | LeaseRefused] = []
        if ask.epoch > self.highest:
            self.highest = ask.epoch
            out.append(PersistEpoch(ask.epoch))
        self.holder = node
        # Kept from our receipt, stretched by the drift: it ends after the holder stops counting on it.
        self.until = max(self.until, now + self.lease_s * (1 + MAX_DRIFT))
        out.append(LeaseGranted(ask.epoch, ask.ref))
        return out
