"""The typed message bodies (conveyor/protocol/commands.py): one per command of docs/protocol.md, each
round-tripping through its wire form, and malformed ones refused with ProtocolError."""

from __future__ import annotations

import re
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.errors import ProtocolError
from conveyor.protocol import Cmd, encode
from conveyor.protocol import commands as c
from tests.conftest import ROOT


def test_every_command_of_the_spec_has_a_body_type() -> None:
    spec = (ROOT / "docs" / "protocol.md").read_text()
    in_spec = {name for name in re.findall(r"^\| `0x[0-9a-f]{2}` \| (\w+) \|", spec, re.M)}
    assert in_spec == {cmd.name for cmd in Cmd}, "the command summary of docs/protocol.md and Cmd differ"
    assert set(c.BODY_TYPES) == set(Cmd)


# Values a body may hold: strings within the id limit, bounded integers, plain scalars.
ids = st.text(max_size=20)
ints = st.integers(-(2**31), 2**31)
counts = st.integers(0, 2**31)
seqs = st.integers(0, 2**40)
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False), st.text(max_size=10))
plain = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ids, inner, max_size=3),
                     max_leaves=8)


BODIES: dict[Cmd, st.SearchStrategy[Any]] = {
    Cmd.READY: st.builds(
        c.Ready, name=ids, host=ids, pid=counts, mode=st.sampled_from(c.MODE_NAMES), concurrency=ints, credit=ints,
        prefetch=ints, prefetch_auto=st.booleans(), tags=st.lists(ids, max_size=3), session=ids,
        running=st.lists(st.builds(c.AttemptRef, ids, ints), max_size=3), results_seq=seqs,
    ),
    Cmd.RESULTS: st.builds(c.Results, seqs, st.lists(st.builds(
        c.OutcomeEntry, ids, ints, st.booleans(), st.dictionaries(st.sampled_from(["duration", "retryable"]), scalars),
        counts))),
    Cmd.GIVEBACK: st.lists(st.builds(c.AttemptRef, ids, ints)),
    Cmd.LEAVING: st.just(c.Empty()),
    Cmd.GOODBYE: st.just(c.Empty()),
    Cmd.PROGRESS: st.lists(st.builds(c.ProgressEntry, ids, ints, st.none() | st.floats(0.0, 1.0),
                                     st.none() | st.text(max_size=20))),
    Cmd.OUTPUT: st.lists(st.builds(c.OutputEntry, ids, ints, st.sampled_from(["stdout", "stderr", "log"]), st.text())),
    Cmd.LENT: st.builds(c.Lent, counts),
    Cmd.ASSIGN: st.builds(c.Assign, seqs, st.lists(st.builds(
        c.AssignEntry, ids, ints, st.none() | st.floats(0.001, 1e6), st.tuples(ids) | st.just(()), counts,
        st.lists(st.builds(c.ParentResult, ids, st.sampled_from(["succeeded", "failed"]), counts,
                           st.none() | st.just({"message": "boom"})), max_size=3),
        st.none() | st.builds(c.JoinedResults, st.lists(counts, max_size=5), st.lists(counts, max_size=3))))),
    Cmd.RESEND: st.builds(c.Resend, seqs),
    Cmd.CANCEL: st.builds(c.Cancel, ids, ints),
    Cmd.RECONNECT: st.builds(c.Reconnect, ids),
    Cmd.HELLO: st.builds(c.Hello, ids, counts, plain),
    Cmd.SUBMIT: st.lists(st.builds(
        c.SubmitEntry, ids,
        st.builds(c.TaskOptions, fn=ids, retries=counts, keep=st.booleans()).map(lambda o: msgspec.Raw(o.to_wire()))
        | st.just(msgspec.Raw(b"\xc0")),
        counts,
    )),
    Cmd.WATCH: st.builds(c.Ids, st.lists(ids), plain),
    Cmd.CANCEL_JOBS: st.builds(c.CancelJobs, st.lists(ids), plain),
    Cmd.STATUS: st.builds(c.Request, plain),
    Cmd.JOB_INFO: st.builds(c.Ids, st.lists(ids), plain),
    Cmd.JOBS: st.builds(c.JobsQuery, plain, st.none() | st.lists(ids, max_size=5), st.none() | st.floats(0, 1e6),
                        st.none() | ids, st.none() | counts),
    Cmd.ACK: st.builds(c.Ack, seqs),
    Cmd.LIMITS: st.builds(c.LimitsRequest, st.dictionaries(ids, st.none() | st.sampled_from(["10/s", "concurrency:2"]),
                                                           max_size=3), plain),
    Cmd.LIMITS_REPLY: st.builds(c.LimitsReply, st.lists(st.dictionaries(ids, plain, max_size=3)), st.none() | ids,
                                plain),
    Cmd.SCHEDULE: st.builds(
        c.ScheduleRequest, st.sampled_from(["upsert", "list", "pause", "backfill"]), ids,
        st.none() | st.builds(c.ScheduleSpec, cron=st.none() | st.just("*/5 * * * *"),
                              every_s=st.none() | st.floats(1, 1e6), tz=st.sampled_from(["UTC", "Europe/Berlin"]),
                              jitter_s=st.floats(0, 60)),
        until=st.none() | st.floats(0, 2e9), count=st.integers(1, 1000), req=plain,
    ),
    Cmd.SCHEDULE_REPLY: st.builds(c.ScheduleReply, st.lists(st.dictionaries(ids, plain, max_size=3), max_size=3),
                                  st.lists(ids, max_size=3), st.lists(st.floats(0, 2e9), max_size=3),
                                  st.none() | ids, plain),
    Cmd.LOGS: st.builds(c.LogsQuery, ids, plain, st.dictionaries(st.sampled_from(["stdout", "stderr"]), counts)),
    Cmd.WELCOME: st.builds(c.Welcome, ids, st.floats(0.01, 100), plain),
    Cmd.ACCEPTED: st.builds(c.Accepted, st.lists(ids), st.lists(st.tuples(ids, ids)), st.lists(ids)),
    Cmd.JOB_DONE: st.builds(c.JobDone, seqs, st.lists(st.builds(
        c.JobDoneEntry, ids, st.sampled_from(["succeeded", "failed", "unknown"]),
        st.dictionaries(ids, plain, max_size=3), counts))),
    Cmd.STATUS_REPLY: st.builds(c.StatusReply, queued=counts, running=counts, uptime=st.floats(0, 1e6), req=plain),
    Cmd.JOB_INFO_REPLY: st.builds(c.JobInfoReply, st.lists(st.none() | st.dictionaries(ids, plain, max_size=3)), plain),
    Cmd.CANCELLED: st.builds(c.Cancelled, st.lists(ids), plain),
    Cmd.JOBS_REPLY: st.builds(c.JobsReply, st.lists(st.dictionaries(ids, plain, max_size=3)), st.booleans(), plain),
    Cmd.LOGS_REPLY: st.builds(c.LogsReply, ids, st.none() | ids, st.none() | ints, req=plain),
    Cmd.HEARTBEAT: st.builds(c.Heartbeat, ids, ids, st.none() | st.floats(0.01, 100), st.none() | seqs),
    Cmd.ERROR: st.builds(c.Error, ids, ids),
    Cmd.SHUTDOWN: st.builds(c.Shutdown, ids),
    # the standby pair (docs/protocol.md §18)
    Cmd.REDIRECT: st.builds(c.Redirect, ids, seqs),
    Cmd.STALE: st.builds(c.Stale, seqs),
    Cmd.PAIR_BEAT: st.builds(c.PairBeat, seqs, st.booleans(), seqs, seqs, seqs, ids, seqs, st.booleans()),
    Cmd.PROMOTE: st.builds(c.PromoteRequest, st.booleans(), plain),
    Cmd.PROMOTE_REPLY: st.builds(c.PromoteReply, st.booleans(), ids, plain),
    Cmd.PAIR_BATCH: st.builds(
        c.PairBatch, seqs, seqs, seqs,
        st.lists(st.builds(c.ShippedInsert, ids, seqs, st.none() | st.binary(max_size=8), st.binary(max_size=8),
                           counts, st.none() | st.binary(max_size=8)), max_size=3),
        st.lists(st.builds(c.ShippedFinish, st.sampled_from(["succeeded", "failed"]), ints, st.binary(max_size=8),
                           st.binary(max_size=8), counts, st.none() | st.floats(0, 2e9), ids), max_size=3),
        st.lists(ids, max_size=3), st.lists(st.tuples(ids, st.none() | st.binary(max_size=8)), max_size=2),
    ),
    Cmd.PAIR_ACK: st.builds(c.PairAck, seqs, seqs, seqs, st.booleans()),
    Cmd.LEASE: st.builds(c.Lease, ids, seqs, seqs),
    Cmd.LEASE_REPLY: st.builds(c.LeaseReply, st.booleans(), seqs, seqs, seqs),
}


def test_every_body_type_has_a_strategy() -> None:
    assert set(BODIES) == set(Cmd)


@pytest.mark.parametrize("cmd", list(Cmd), ids=lambda cmd: cmd.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_bodies_round_trip(cmd: Cmd, data: st.DataObject) -> None:
    body = data.draw(BODIES[cmd])
    wire = c.encode_body(body)
    again = c.decode_body(cmd, wire)
    if cmd == Cmd.SUBMIT:  # Raw compares by identity: compare what it holds
        assert [(e.job_id, bytes(e.options), e.n_frames) for e in again] == [
            (e.job_id, bytes(e.options), e.n_frames) for e in body
        ]
    else:
        assert again == body
    assert c.encode_body(again) == wire
    # ...and through the framing, as peers send it
    parts = encode(cmd, body, [b"x"] * 3)
    assert c.decode_message(parts).cmd == cmd


def test_entries_are_the_positional_arrays_of_the_spec() -> None:
    entry = c.AssignEntry("job-1", 2, 30.0, ("ValueError",), 1)
    wire = msgpack.unpackb(c.encode_body(c.Assign(7, [entry])))
    assert wire == {"ack": 7, "tasks": [["job-1", 2, 30.0, ["ValueError"], 1, [], None, []]]}  # no parents, no shm
    # parents joined (docs/protocol.md §8.3): [lengths, chunks] after the per-parent array, which is empty
    joined = c.AssignEntry("job-2", 1, None, (), 1, [], c.JoinedResults([3, 5, 2], [2, 1]))
    wire = msgpack.unpackb(c.encode_body(c.Assign(0, [joined])))
    assert wire["tasks"] == [["job-2", 1, None, [], 1, [], [[3, 5, 2], [2, 1]], []]]
    # a call frame in shared memory (docs/protocol.md §8.4): [index, name, bytes], its frame left empty
    name = "conveyor-d-1-2-" + "0" * 32
    mapped = c.AssignEntry("job-3", 1, None, (), 2, [], None, (c.ShmRef(1, name, 9),))
    assert msgpack.unpackb(c.encode_body(c.Assign(0, [mapped])))["tasks"][0][-1] == [[1, name, 9]]
    assert c.decode_body(Cmd.ASSIGN, c.encode_body(c.Assign(0, [mapped]))).tasks == [mapped]
    assert c.decode_body(Cmd.ASSIGN, c.encode_body(c.Assign(0, [joined]))).tasks == [joined]
    assert joined.total_frames == 1 + 2  # the call's frame, then two joined frames
    # the older layout, without `joined` (and without `parents`), is still read
    old = msgpack.packb({"ack": 0, "tasks": [["j", 1, None, [], 1, [["p", "succeeded", 2, None]]],
                                             ["k", 1, None, [], 1]]})
    tasks = c.decode_body(Cmd.ASSIGN, old).tasks
    assert [t.joined for t in tasks] == [None, None] and [t.total_frames for t in tasks] == [3, 1]
    assert tasks[0].parents == [c.ParentResult("p", "succeeded", 2, None)]
    outcome = c.decode_body(Cmd.RESULTS, msgpack.packb({"seq": 3, "outcomes": [["j", 1, True, {"duration": 0.5}, 1]]}))
    assert outcome == c.Results(3, [c.OutcomeEntry("j", 1, True, {"duration": 0.5}, 1)])
    # a newer peer's extra trailing fields and keys are ignored
    extra = msgpack.packb({"seq": 1, "outcomes": [["j", 1, True, {}, 0, "extra"]], "more": 1})
    assert c.decode_body(Cmd.RESULTS, extra).outcomes[0].job_id == "j"
    assert c.decode_body(Cmd.CANCEL, msgpack.packb({"job": "j", "attempt": 3, "new": 1})) == c.Cancel("j", 3)


@pytest.mark.parametrize(
    ("cmd", "body"),
    [
        (Cmd.RESULTS, {"not": "an array"}),
        (Cmd.RESULTS, [["j", 1, True, {}, 0]]),  # protocol 1's shape
        (Cmd.RESULTS, {"seq": 1, "outcomes": [["j", 1, True, {"kind": 5}, 0]]}),  # an error record's strings
        (Cmd.RESULTS, {"seq": 1, "outcomes": [["j", 1.5, True, {}, 0]]}),
        (Cmd.RESULTS, {"seq": 1, "outcomes": [["j", 1, True, {"nested": {"too": "deep"}}, 0]]}),
        (Cmd.RESULTS, {"seq": 1, "outcomes": [["j" * 2000, 1, True, {}, 0]]}),
        (Cmd.RESULTS, {"seq": -1, "outcomes": []}),
        (Cmd.SUBMIT, [["j", None, -1]]),
        (Cmd.SUBMIT, [[7, None, 1]]),
        (Cmd.READY, {"name": "w"}),
        (Cmd.READY, {"name": "w", "host": "h", "pid": 1, "mode": "threads", "concurrency": 2**40, "credit": 1}),
        (Cmd.PROGRESS, [["j", 1, 1.5, None]]),
        (Cmd.WATCH, {"ids": "not a list"}),
        (Cmd.GIVEBACK, [[[]] * 3]),
        (Cmd.HEARTBEAT, [1, 2, 3]),
    ],
)
def test_malformed_bodies_are_refused(cmd: Cmd, body: Any) -> None:
    with pytest.raises(ProtocolError):
        c.decode_body(cmd, msgpack.packb(body))


def test_garbage_bytes_and_extension_types_are_refused() -> None:
    for raw in (b"\xc1", b"\x91" * 10_000 + b"\xc0", msgpack.packb({"role": msgpack.ExtType(1, b"x")})):
        with pytest.raises(ProtocolError):
            c.decode_body(Cmd.HEARTBEAT, raw)


def test_options_are_judged_per_entry_with_readable_reasons() -> None:
    good, bad = c.decode_body(Cmd.SUBMIT, msgpack.packb([["a", {"retries": 2}, 1], ["b", {"retries": -1}, 1]]))
    assert c.options_from_raw(good.options).retries == 2
    with pytest.raises(ValueError, match="retries must be a non-negative integer"):
        c.options_from_raw(bad.options)
    assert c.options_from_raw(msgspec.Raw(b"\xc0")) == c.TaskOptions()
    assert c.options(tags=["gpu"], timeout=3).tags == frozenset({"gpu"})
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        c.options(timeout=0)


def test_the_client_and_the_worker_check_mode_names_through_the_protocol() -> None:
    from conveyor.worker.modes import MODES

    assert tuple(MODES) == c.MODE_NAMES
