"""The body of every command, typed: one definition used by the dispatcher, the worker and the client.

Each body is a msgspec Struct (frozen, slotted, decoded and validated in C). Entries of batches
(ASSIGN, RESULTS, SUBMIT, JOB_DONE, ...) are `array_like`: on the wire they are the positional
arrays docs/protocol.md shows, so the format did not change when these types replaced the lists
built by hand. Single-message bodies are maps. Both are forward compatible: an array entry may carry
more trailing fields than a reader knows and a map more keys; both are ignored.

    decode_message(parts) -> Message          the frames of one message, its body typed
    decode_body(cmd, raw) -> the typed body    raises ProtocolError on anything malformed
    encode_body(body) -> bytes                 a Struct, a list of them, or plain msgpack values
                                               (frames.encode(cmd, body, frames) uses it)

Only what peers send the dispatcher is typed tightly (bounded strings, lists and integers, no free
nesting): any bytes a peer sends must fail here, cheaply, or come out as values the dispatcher can
keep and re-encode. Replies to clients carry nested status maps, typed loosely.

Over ~500 lines on purpose: it is the one catalogue of message bodies, read by looking a command up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, TypeAlias

import msgspec

from conveyor.errors import ProtocolError
from conveyor.protocol.frames import Cmd, Message, split

MODE_NAMES = ("threads", "processes", "asyncio", "interpreters")  # worker execution modes; tasks are routed on them

MAX_ID = 1024  # characters of a job id, a name, a host, a tag, a session
MAX_BATCH = 1 << 20  # entries of one batch (SUBMIT, RESULTS, WATCH ids, ...)
MAX_TAGS = 1024

Id = Annotated[str, msgspec.Meta(max_length=MAX_ID)]
Int32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**31)]  # frames of an entry, a pid, a limit
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # a message sequence number
Attempt = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
IdList = Annotated[list[Id], msgspec.Meta(max_length=MAX_BATCH)]
Tags = Annotated[list[Id], msgspec.Meta(max_length=MAX_TAGS)]
Scalar: TypeAlias = str | int | float | bool | None


class Body(msgspec.Struct, frozen=True):
    """A map body: a field with a default may be left out by a sender."""


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """One entry of a batch: a positional array on the wire."""


# --- worker -> dispatcher ---------------------------------------------------------------------------


class AttemptRef(Entry, frozen=True):
    """[job_id, attempt]: one assignment (READY `running`, GIVEBACK)."""

    job_id: Id
    attempt: Attempt


class Ready(Body, frozen=True):
    """READY: a worker registers, or registers again (§5)."""

    name: Id
    host: Id
    pid: Count
    mode: Id
    concurrency: Int32
    credit: Int32
    prefetch: Int32 = 0
    prefetch_auto: bool = False
    tags: Tags = []
    session: Id = ""
    running: Annotated[list[AttemptRef], msgspec.Meta(max_length=MAX_BATCH)] = []
    # The sequence number of the first RESULTS this connection sends (outcomes re-sent included): the
    # dispatcher applies RESULTS in that order from there (§5, RESULTS).
    results_seq: Seq = 1
    shm: Id = ""  # its /dev/shm (protocol/shm.py namespace_id): the same as the dispatcher's, ASSIGN may name segments


class OutcomeEntry(Entry, frozen=True):
    """A RESULTS entry: how one attempt ended. `info` is {duration} or an error record (§9), flat."""

    job_id: Id
    attempt: Attempt
    ok: bool
    info: dict[str, Scalar]
    n_frames: Count


class Results(Body, frozen=True):
    """RESULTS: a batch of outcomes, numbered per worker process (1, 2, ...). The dispatcher applies them
    in order and acknowledges the highest it applied (HEARTBEAT and ASSIGN `ack`); the worker keeps
    each batch until then and re-sends what is unacknowledged after a reconnection or a RESEND."""

    seq: Seq
    outcomes: Annotated[list[OutcomeEntry], msgspec.Meta(max_length=MAX_BATCH)]


class ProgressEntry(Entry, frozen=True):
    """A PROGRESS entry: the latest report of a running task."""

    job_id: Id
    attempt: Attempt
    fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None
    message: str | None


class OutputEntry(Entry, frozen=True):
    """An OUTPUT entry: what a running task wrote to one stream since the last one."""

    job_id: Id
    attempt: Attempt
    stream: Id
    text: str


class Empty(Body, frozen=True):
    """LEAVING, GOODBYE: no fields."""


# --- dispatcher -> worker ---------------------------------------------------------------------------


class ParentResult(Entry, frozen=True, gc=False):  # untracked: a fan-in ASSIGN has 100,000
    """How one parent of a task ended, in its ASSIGN entry: its result frames follow the task's call
    frames (in `parents` order), and the worker passes the value where the call refers to the parent."""

    job_id: Id
    state: str  # succeeded, or (with allow_failure) failed, cancelled, expired
    n_frames: Count
    error: dict[str, Any] | None = None  # the parent's error record, when it did not succeed


class JoinedResults(Entry, frozen=True, gc=False):
    """The parents of a task when every one succeeded with a one-frame result (a fan-in, most often):
    their results joined, in order, into `len(chunks)` data frames after the call's, instead of one
    ParentResult and one frame per parent. Frame i holds the next `chunks[i]` results; `lengths` is
    each result's size in bytes. A chunk stays under frames.PACK_MAX unless it is one large result."""

    lengths: Annotated[list[Count], msgspec.Meta(max_length=MAX_BATCH)]
    chunks: Annotated[list[Count], msgspec.Meta(max_length=MAX_BATCH)]


class ShmRef(Entry, frozen=True):
    """[index, name, nbytes]: data frame `index` of an entry is empty, its bytes are in /dev/shm/`name`."""

    index: Count
    name: Id
    nbytes: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]


ShmRefs = Annotated[tuple[ShmRef, ...], msgspec.Meta(max_length=MAX_BATCH)]


class AssignEntry(Entry, frozen=True):
    """An ASSIGN entry: a task, how many of the message's data frames are its call, and its parents'
    results (their frames follow the call's): one ParentResult each, or all of them `joined`."""

    job_id: Id
    attempt: Attempt
    timeout: float | None
    retry_on: tuple[str, ...]
    n_frames: Count
    parents: list[ParentResult] = []
    joined: JoinedResults | None = None  # newer than `parents`: a reader still accepts either
    shm: ShmRefs = ()  # call frames in shared memory (a worker on the dispatcher's host)

    @property
    def total_frames(self) -> int:
        n = self.n_frames + sum(p.n_frames for p in self.parents)
        return n if self.joined is None else n + len(self.joined.chunks)


class Assign(Body, frozen=True):
    """ASSIGN: a batch of tasks, and the highest RESULTS sequence number applied so far (`ack`)."""

    ack: Seq
    tasks: list[AssignEntry]


class Lent(Body, frozen=True):
    """LENT: how many of the worker's slots are lent right now (tasks blocked on their children, §10.3)."""

    slots: Count


class Resend(Body, frozen=True):
    """RESEND: RESULTS from `seq` on never arrived: re-send every unacknowledged batch from there."""

    seq: Seq


class Cancel(Body, frozen=True):
    """CANCEL: stop this attempt."""

    job: Id
    attempt: Attempt


class Reconnect(Body, frozen=True):
    """RECONNECT: "I don't know you", re-send READY."""

    instance: str = ""


# --- client -> dispatcher ---------------------------------------------------------------------------


class TaskOptions(Body, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    """A task's options (SUBMIT), as the client builds them and the dispatcher keeps them (§6)."""

    fn: Annotated[str, msgspec.Meta(max_length=4096)] = "?"  # display name, for status and errors
    mode: Id | None = None
    tags: Annotated[frozenset[Id], msgspec.Meta(max_length=MAX_TAGS)] = frozenset()
    retries: Annotated[int, msgspec.Meta(ge=0, le=2**31)] = 0
    retry_backoff: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    timeout: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    retry_on: Annotated[tuple[Id, ...], msgspec.Meta(max_length=MAX_TAGS)] = ()
    keep: bool = False  # keep the result after delivering it (CLI jobs, fetched later by id)
    # Work that waits (docs/protocol.md §10): a priority, a due time, an expiry, limit keys.
    priority: Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31)] = 0  # higher runs first
    eta: Annotated[float, msgspec.Meta(ge=0.0)] | None = None  # run not before this Unix time
    countdown: Annotated[float, msgspec.Meta(ge=0.0, le=10.0 * 365 * 86400)] | None = None  # ...or in this many s
    expires_at: Annotated[float, msgspec.Meta(ge=0.0)] | None = None  # not started by this Unix time: expired
    expires_in: Annotated[float, msgspec.Meta(gt=0.0, le=10.0 * 365 * 86400)] | None = None  # ...or after this
    limits: Annotated[tuple[Id, ...], msgspec.Meta(max_length=16)] = ()  # keys declared on the dispatcher
    rate_limit: Annotated[str, msgspec.Meta(max_length=64)] | None = None  # this function's own key: "10/s"

    @property
    def limit_keys(self) -> tuple[str, ...]:
        """Every limit key this task waits for: its `limits`, and `fn:<its function>` with a rate_limit."""
        if self.rate_limit is None:
            return self.limits
        return (*self.limits, f"fn:{self.fn}")

    @classmethod
    def from_wire(cls, raw: Any) -> TaskOptions:
        """Options from decoded msgpack values (a map, or nil); ValueError with a readable reason."""
        if raw is None:
            return DEFAULT_OPTIONS
        if type(raw) is dict and "keep" in raw:
            raw = {**raw, "keep": bool(raw["keep"])}  # any truthy value keeps, as before
        try:
            return msgspec.convert(raw, cls)
        except msgspec.ValidationError as exc:
            raise ValueError(_options_error(exc)) from None

    def to_wire(self) -> bytes:
        return _encoder.encode(self)

    @property
    def class_key(self) -> tuple[str | None, frozenset[str]]:
        """The queue the task waits in: (mode or None, required tags)."""
        return (self.mode, self.tags)


class SubmitEntry(Entry, frozen=True):
    """A SUBMIT entry. `options` stays raw msgpack until the dispatcher reads it (options_from_raw): a
    bad one rejects its entry only, and a batch's entries usually share the same bytes."""

    job_id: Id
    options: msgspec.Raw  # a map, or nil: no options
    n_frames: Count
    parents: Annotated[tuple[Id, ...], msgspec.Meta(max_length=MAX_BATCH)] = ()  # results the call refers to
    after: Annotated[tuple[Id, ...], msgspec.Meta(max_length=MAX_BATCH)] = ()  # only run after these
    allow_failure: Annotated[tuple[Id, ...], msgspec.Meta(max_length=MAX_BATCH)] = ()  # run even if these fail
    batch: Id = ""  # the entries of one batch (one message) are accepted all or none
    shm: ShmRefs = ()  # call frames in shared memory (a client on the dispatcher's host)


class Hello(Body, frozen=True):
    client: str = ""
    pid: int = 0
    req: Any = None


class Ack(Body, frozen=True):
    """ACK: every JOB_DONE up to `seq` arrived (the dispatcher may forget what those delivered)."""

    seq: Seq


class Ids(Body, frozen=True):
    """WATCH, JOB_INFO: job ids (and a correlation id)."""

    ids: IdList
    req: Any = None


class CancelJobs(Body, frozen=True):
    ids: IdList
    req: Any = None


class Request(Body, frozen=True):
    """STATUS: nothing but a correlation id."""

    req: Any = None


class JobsQuery(Body, frozen=True):
    """JOBS: list jobs by state, age and function."""

    req: Any = None
    states: Annotated[list[Id], msgspec.Meta(max_length=16)] | None = None
    since: float | None = None
    fn: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    limit: Count | None = None


class LogsQuery(Body, frozen=True):
    """LOGS: a job's output from these offsets on."""

    id: Id
    req: Any = None
    offsets: Annotated[dict[Id, Count], msgspec.Meta(max_length=16)] = {}


class LimitsRequest(Body, frozen=True):
    """LIMITS: set rules (`{key: rule}`, a rule nil removes the key), then list every key."""

    set: Annotated[dict[Id, Annotated[str, msgspec.Meta(max_length=64)] | None], msgspec.Meta(max_length=256)] = {}
    req: Any = None


class ScheduleSpec(Body, frozen=True, forbid_unknown_fields=False):
    """When a schedule fires and what it does about missed runs and overlaps (docs/schedules.md)."""

    cron: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    every_s: float | None = None
    offset_s: float = 0.0
    tz: Annotated[str, msgspec.Meta(max_length=100)] = "UTC"
    misfire: Annotated[str, msgspec.Meta(max_length=20)] = "once"
    catchup_window_s: float = 86400.0
    max_catchup: int = 100
    overlap: Annotated[str, msgspec.Meta(max_length=20)] = "skip"
    jitter_s: float = 0.0
    pause_on_failure: bool = False


class ScheduleRequest(Body, frozen=True):
    """SCHEDULE: `op` is upsert (spec and options; the data frames are the task's call), list, show,
    preview (count), pause (until), resume, trigger, backfill (start, end) or delete."""

    op: Annotated[str, msgspec.Meta(max_length=20)]
    name: Annotated[str, msgspec.Meta(max_length=100)] = ""
    spec: ScheduleSpec | None = None
    options: msgspec.Raw = msgspec.Raw(b"\xc0")
    until: float | None = None
    start: float | None = None
    end: float | None = None
    count: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    req: Any = None


# --- dispatcher -> client ---------------------------------------------------------------------------


class Welcome(Body, frozen=True):
    instance: str
    heartbeat_interval: float = 1.0
    req: Any = None
    shm: str = ""  # the dispatcher's /dev/shm (protocol/shm.py namespace_id): a client with the same may use it


class Accepted(Body, frozen=True):
    """ACCEPTED: every entry of a SUBMIT in exactly one list."""

    accepted: list[str] = []
    rejected: list[tuple[str, ...]] = []  # [job_id, reason] or [job_id, reason, kind]: the entry itself is wrong
    busy: list[str] = []  # no room now: send again later
    refused: list[tuple[str, str]] = []  # [job_id, reason]: cannot be made durable now (the journal's disk is full)


class JobDoneEntry(Entry, frozen=True):
    """A JOB_DONE entry: a finished job (state succeeded, failed, cancelled, or unknown)."""

    job_id: str
    state: str
    info: dict[str, Any]
    n_frames: Count
    withheld: bool = False  # the result stays in the dispatcher (its dependants use it); WATCH fetches it


class JobDone(Body, frozen=True):
    """JOB_DONE: finished jobs, numbered per client (1, 2, ...); the client acknowledges them (ACK), and
    a gap in the numbers tells it that a JOB_DONE went missing."""

    seq: Seq
    jobs: list[JobDoneEntry]


class Cancelled(Body, frozen=True):
    cancelled: list[str] = []
    req: Any = None


class StatusReply(Body, frozen=True, forbid_unknown_fields=False):
    """STATUS_REPLY (§6): workers, queues and totals; the nested rows are maps (their keys in the spec)."""

    workers: list[dict[str, Any]] = []
    queued: int = 0
    running: int = 0
    delayed: int = 0
    queues: list[dict[str, Any]] = []
    totals: dict[str, int] = {}
    dispatcher: dict[str, Any] = {}
    slots: dict[str, int] = {}
    security: dict[str, Any] = {}
    throughput: dict[str, float] = {}
    uptime: float = 0.0
    started_at: float = 0.0
    req: Any = None


class JobInfoReply(Body, frozen=True):
    """JOB_INFO_REPLY: one view (a map) or nil per requested id."""

    jobs: list[dict[str, Any] | None] = []
    req: Any = None


class JobsReply(Body, frozen=True):
    jobs: list[dict[str, Any]] = []
    truncated: bool = False
    req: Any = None


class PromoteRequest(Body, frozen=True):
    """PROMOTE: become the active dispatcher of the pair; `force` even with a journal behind the active's."""

    force: bool = False
    req: Any = None


class PromoteReply(Body, frozen=True):
    """PROMOTE_REPLY: `ok` (promoting, or already active) or refused; `message` says which and why."""

    ok: bool
    message: Annotated[str, msgspec.Meta(max_length=500)] = ""
    req: Any = None


class LimitsReply(Body, frozen=True):
    """LIMITS_REPLY: each key (rule, tokens or running, waiting, oldest wait); `error` if a rule was refused."""

    limits: list[dict[str, Any]] = []
    error: str | None = None
    req: Any = None


class ScheduleReply(Body, frozen=True):
    """SCHEDULE_REPLY: the schedules concerned, the jobs a trigger or backfill created, a preview's slots."""

    schedules: list[dict[str, Any]] = []
    jobs: list[str] = []
    preview: list[float] = []
    error: str | None = None
    req: Any = None


class LogsReply(Body, frozen=True):
    id: str
    state: str | None = None
    attempt: int | None = None
    streams: dict[str, dict[str, Any]] = {}
    progress: dict[str, Any] | None = None
    req: Any = None


# --- any peer ---------------------------------------------------------------------------------------


class Heartbeat(Body, frozen=True):
    """HEARTBEAT: a worker's or client's ping ({role}), or the dispatcher's beat."""

    role: str = ""
    instance: str = ""
    heartbeat_interval: float | None = None
    # client -> dispatcher: JOB_DONE received up to here (as ACK); dispatcher -> worker: RESULTS applied
    # up to here. A lost ACK is made good by the next heartbeat.
    ack: Seq | None = None


class Error(Body, frozen=True):
    code: str = ""
    message: str = ""


class Shutdown(Body, frozen=True):
    instance: str = ""


# --- the standby pair (docs/standby.md) --------------------------------------------------------------

Epoch = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Redirect(Body, frozen=True):
    """REDIRECT: a passive dispatcher refuses a request. `active`: the active's address if it hears one
    ("" if not: ask again here), `epoch`: the highest epoch it knows."""

    active: str = ""
    epoch: Epoch = 0


class Stale(Body, frozen=True):
    """STALE: a worker or client refused a message: it has obeyed `epoch`, higher than the sender's."""

    epoch: Epoch


class PairBeat(Body, frozen=True):
    """PAIR_BEAT: one dispatcher's heartbeat to the other (standby.py PeerBeat), its client endpoint, and
    `stream`: the epoch of the batches its `seq` counts (0: none applied since its start)."""

    epoch: Epoch
    active: bool
    seq: Seq
    ref: Seq
    echo: Seq = 0
    endpoint: str = ""
    stream: Epoch = 0
    promote: bool = False  # an operator promoted the sender: the active yields to it
    instance: str = ""  # the sending process (its node id, new at each start): a restarted one is sent a snapshot now


class ShippedInsert(Entry, frozen=True):
    """[id, seq, owner, opts, n_frames, deps]: a job as the journal inserts it; its call frames follow."""

    job_id: Id
    seq: Seq
    owner: bytes | None
    opts: bytes
    n_frames: Count
    deps: bytes | None = None


class ShippedFinish(Entry, frozen=True):
    """[state, attempts, history, info, n_frames, expires_at, id]: a finished job; its result frames follow."""

    state: Id
    attempts: Attempt
    history: bytes
    info: bytes
    n_frames: Count
    expires_at: float | None
    job_id: Id


class PairBatch(Body, frozen=True):
    """PAIR_BATCH: batch `seq` of the active's journal in `epoch` (inserts' then finishes' frames follow).
    `snapshot` > 0: the whole journal as of `seq` (the passive replaces its jobs with it). `handover`: the
    other way, what a former active held that the snapshot lacked (jobs it alone knew, final states it alone
    reached), for the active to merge."""

    epoch: Epoch
    seq: Seq
    snapshot: Seq = 0
    inserts: list[ShippedInsert] = []
    finishes: list[ShippedFinish] = []
    deletes: list[Id] = []
    schedules: list[tuple[str, bytes | None]] = []
    handover: bool = False  # passive -> active: what only the sender's journal holds (the merge)


class PairAck(Body, frozen=True):
    """PAIR_ACK: the passive committed everything of `epoch` up to `seq`; `snapshot`: the last snapshot
    it applied; `want`: it cannot apply the stream (a gap, or no snapshot yet) and asks for a snapshot."""

    epoch: Epoch
    seq: Seq
    snapshot: Seq = 0
    want: bool = False


class Lease(Body, frozen=True):
    """LEASE: dispatcher `node` asks the witness for (or to renew) the lease for `epoch`."""

    node: Id
    epoch: Epoch
    ref: Seq


class LeaseReply(Body, frozen=True):
    """LEASE_REPLY: `granted` (for epoch, answering ref) or refused; `highest`: the highest epoch granted."""

    granted: bool
    epoch: Epoch
    ref: Seq
    highest: Epoch = 0


# --- the table, and decoding ------------------------------------------------------------------------

BODY_TYPES: dict[Cmd, Any] = {
    Cmd.READY: Ready,
    Cmd.RESULTS: Results,
    Cmd.GIVEBACK: Annotated[list[AttemptRef], msgspec.Meta(max_length=MAX_BATCH)],
    Cmd.LEAVING: Empty,
    Cmd.GOODBYE: Empty,
    Cmd.PROGRESS: Annotated[list[ProgressEntry], msgspec.Meta(max_length=MAX_BATCH)],
    Cmd.OUTPUT: Annotated[list[OutputEntry], msgspec.Meta(max_length=MAX_BATCH)],
    Cmd.LENT: Lent,
    Cmd.ASSIGN: Assign,
    Cmd.RESEND: Resend,
    Cmd.CANCEL: Cancel,
    Cmd.RECONNECT: Reconnect,
    Cmd.HELLO: Hello,
    Cmd.SUBMIT: Annotated[list[SubmitEntry], msgspec.Meta(max_length=MAX_BATCH)],
    Cmd.WATCH: Ids,
    Cmd.CANCEL_JOBS: CancelJobs,
    Cmd.STATUS: Request,
    Cmd.JOB_INFO: Ids,
    Cmd.JOBS: JobsQuery,
    Cmd.LOGS: LogsQuery,
    Cmd.ACK: Ack,
    Cmd.LIMITS: LimitsRequest,
    Cmd.SCHEDULE: ScheduleRequest,
    Cmd.PROMOTE: PromoteRequest,
    Cmd.WELCOME: Welcome,
    Cmd.ACCEPTED: Accepted,
    Cmd.JOB_DONE: JobDone,
    Cmd.STATUS_REPLY: StatusReply,
    Cmd.JOB_INFO_REPLY: JobInfoReply,
    Cmd.CANCELLED: Cancelled,
    Cmd.JOBS_REPLY: JobsReply,
    Cmd.LOGS_REPLY: LogsReply,
    Cmd.LIMITS_REPLY: LimitsReply,
    Cmd.SCHEDULE_REPLY: ScheduleReply,
    Cmd.PROMOTE_REPLY: PromoteReply,
    Cmd.HEARTBEAT: Heartbeat,
    Cmd.ERROR: Error,
    Cmd.SHUTDOWN: Shutdown,
    Cmd.REDIRECT: Redirect,
    Cmd.STALE: Stale,
    Cmd.PAIR_BEAT: PairBeat,
    Cmd.PAIR_BATCH: PairBatch,
    Cmd.PAIR_ACK: PairAck,
    Cmd.LEASE: Lease,
    Cmd.LEASE_REPLY: LeaseReply,
}


def _reject_ext(code: int, data: memoryview) -> Any:
    raise ProtocolError(f"message bodies never hold msgpack extension types (got type {code})")


_DECODERS = {cmd: msgspec.msgpack.Decoder(t, ext_hook=_reject_ext) for cmd, t in BODY_TYPES.items()}
_OPTIONS = msgspec.msgpack.Decoder(TaskOptions, ext_hook=_reject_ext)
_encoder = msgspec.msgpack.Encoder()


def _check_outcomes(results: Results) -> None:
    for e in results.outcomes:
        for key in ("kind", "type", "message", "traceback"):
            value = e.info.get(key)
            if value is not None and type(value) is not str:
                raise ProtocolError(f"RESULTS entry {e.job_id!r}: info {key!r} must be a string")


_CHECKS: dict[Cmd, Any] = {Cmd.RESULTS: _check_outcomes}  # what a type cannot say


def decode_body(cmd: Cmd, raw: bytes | memoryview) -> Any:
    """The typed body of a `cmd` message; ProtocolError if it does not match docs/protocol.md."""
    try:
        body = _DECODERS[cmd].decode(raw)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{cmd.name} body: {exc}") from None
    except ProtocolError:
        raise
    except (msgspec.DecodeError, RecursionError, OverflowError, ValueError) as exc:
        raise ProtocolError(f"{cmd.name} body is not valid msgpack: {type(exc).__name__}") from None
    check = _CHECKS.get(cmd)
    if check is not None:
        check(body)
    return body


def decode_message(parts: Sequence[Any]) -> Message:
    """One message (envelope removed) with its typed body: what every peer reads.

    Raises VersionMismatch for another Conveyor version and ProtocolError for anything malformed."""
    cmd, raw, frames = split(parts)
    return Message(cmd, decode_body(cmd, raw), frames)


def encode_body(body: Any) -> bytes:
    """A body's bytes: a Struct, a list of Structs, or plain msgpack values."""
    return _encoder.encode(body)


_NIL = b"\xc0"


def options_from_raw(raw: msgspec.Raw | bytes) -> TaskOptions:
    """A SUBMIT entry's options; ValueError with a readable reason (the entry is rejected, not the message)."""
    if memoryview(raw) == _NIL:
        return DEFAULT_OPTIONS
    try:
        return _OPTIONS.decode(raw)
    except msgspec.ValidationError as exc:
        raise ValueError(_options_error(exc)) from None
    except (msgspec.DecodeError, RecursionError, ProtocolError) as exc:
        raise ValueError(f"task options must be a map of plain values ({type(exc).__name__})") from None


def options(**values: Any) -> TaskOptions:
    """TaskOptions from Python values, checked as the dispatcher checks them (ValueError, readable)."""
    try:
        return msgspec.convert(values, TaskOptions)
    except msgspec.ValidationError as exc:
        raise ValueError(_options_error(exc)) from None


_OPTION_RULES = {
    "fn": "fn must be a string",
    "mode": "mode must be a string",
    "tags": "tags must be a list of strings",
    "retries": "retries must be a non-negative integer",
    "retry_backoff": "retry_backoff must be a non-negative number",
    "timeout": "timeout must be a positive number",
    "retry_on": "retry_on must be a list of exception type names",
    "keep": "keep must be true or false",
    "priority": "priority must be an integer",
    "eta": "eta must be a Unix time (a timezone-aware datetime)",
    "countdown": "countdown must be a number of seconds, 0 or more",
    "expires_at": "expires_at must be a Unix time (a timezone-aware datetime)",
    "expires_in": "expires must be a positive number of seconds",
    "limits": "limits must be a list of limit keys",
    "rate_limit": "rate_limit must be a rate such as '10/s'",
}


def _options_error(exc: msgspec.ValidationError) -> str:
    """The rule a bad option broke, in words ('retries must be a non-negative integer')."""
    text = str(exc)
    if "- at `$" not in text:
        return "task options must be a map"
    path = text.rpartition("- at `$")[2].rstrip("`")
    name = path.lstrip(".").split("[")[0].split(".")[0]
    return _OPTION_RULES.get(name, f"bad task option {name}: {text.partition(' - at')[0]}")


def raw_options(opts: TaskOptions) -> msgspec.Raw:
    """Options encoded once, to be shared by the SUBMIT entries of many tasks."""
    return msgspec.Raw(_encoder.encode(opts))


DEFAULT_OPTIONS = TaskOptions()
