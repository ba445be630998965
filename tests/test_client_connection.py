"""The client's connection after messages are lost (docs/protocol.md §12): it asks again for what it misses.

A scripted dispatcher (tests/client_peer.py) sends exactly the message a case needs (a JOB_DONE after a
gap in the numbers, an ACCEPTED that refuses a job); a TCP proxy that resets connections
(tests/resetproxy.py) loses real messages between a real client and a real dispatcher.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq

from conveyor import Client, JournalFull
from conveyor.client import connection
from conveyor.protocol import Cmd
from conveyor.protocol.payload import encode_value
from conveyor.transport.sockets import keep_links_alive
from tests import tasks
from tests.client_peer import ScriptedDispatcher
from tests.conftest import Cluster, wait_until
from tests.resetproxy import ResetProxy

_NO_OPTIONS = msgspec.Raw(b"\xc0")  # nil: the dispatcher's defaults


@pytest.fixture
def scripted() -> Iterator[ScriptedDispatcher]:
    peer = ScriptedDispatcher()
    try:
        yield peer
    finally:
        peer.close()


def _submitted_ids(peer: ScriptedDispatcher, want: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < want:
        ids += [entry[0] for entry in peer.expect(Cmd.SUBMIT).body]
    return ids


def _done(seq: int, jobs: list[tuple[str, Any]]) -> tuple[dict[str, Any], list[Any]]:
    entries, frames = [], []
    for job_id, value in jobs:
        data = encode_value(value)
        entries.append([job_id, "succeeded", {"worker": "w", "attempts": 1}, len(data)])
        frames += data
    return {"seq": seq, "jobs": entries}, frames


def test_a_gap_in_job_done_numbers_makes_the_client_ask_again_before_it_acknowledges(
    scripted: ScriptedDispatcher,
) -> None:
    with Client(scripted.address, connect_timeout=10) as client:
        a = client.submit(tasks.noop, "a")
        b = client.submit(tasks.noop, "b")
        assert _submitted_ids(scripted, 2) == [a.job_id, b.job_id]
        scripted.send(Cmd.ACCEPTED, {"accepted": [a.job_id, b.job_id], "rejected": [], "busy": []})
        scripted.send(Cmd.JOB_DONE, *_done(1, [(a.job_id, "a")]))
        assert a.result(10) == "a"
        assert scripted.expect(Cmd.ACK).body == {"seq": 1}
        # JOB_DONE 2 never arrives (it held b's outcome, say): 3 shows the gap
        scripted.send(Cmd.JOB_DONE, *_done(3, []))
        again = scripted.expect(Cmd.SUBMIT)
        assert [entry[0] for entry in again.body] == [b.job_id]  # the same id: idempotent
        ack = scripted.expect(Cmd.ACK)
        assert ack.body == {"seq": 3}
        before = scripted.received[: scripted.received.index(again)]
        assert all(m.body["seq"] < 3 for m in before if m.cmd == Cmd.ACK), "acknowledged past the gap first"
        scripted.send(Cmd.JOB_DONE, *_done(4, [(b.job_id, "b")]))
        assert b.result(10) == "b"
        assert client.duplicate_results == 0


def test_a_job_the_journal_cannot_hold_fails_with_journal_full(scripted: ScriptedDispatcher) -> None:
    with Client(scripted.address, connect_timeout=10) as client:
        fut = client.submit(tasks.noop, 1)
        (job_id,) = _submitted_ids(scripted, 1)
        scripted.send(Cmd.ACCEPTED, {"accepted": [], "rejected": [], "busy": [],
                                     "refused": [[job_id, "the journal's disk is full"]]})
        exc = fut.exception(10)
        assert isinstance(exc, JournalFull), exc
        assert "disk is full" in str(exc)
        assert client.pending() == []


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture
def proxied(cluster: Cluster) -> Iterator[ResetProxy]:
    cluster.wait_for_workers(cluster.start_worker("threads", 2))
    with ResetProxy("127.0.0.1", _port(cluster.address)) as proxy:
        yield proxy


def test_a_submission_lost_with_its_connection_is_sent_again(cluster: Cluster, proxied: ResetProxy) -> None:
    with Client(proxied.address) as client:
        proxied.hold()
        fut = client.submit(tasks.noop, 7)  # its SUBMIT waits in the cut link ...
        proxied.reset()  # ... and is lost with the connection
        proxied.release()
        assert fut.result(20) == 7  # sent again once the client saw a new connection
        assert client._conn is not None and client._conn.resyncs >= 1


def test_a_result_lost_with_its_connection_is_delivered_again(cluster: Cluster, proxied: ResetProxy) -> None:
    observer = cluster.client()
    with Client(proxied.address) as client:
        fut = client.submit(tasks.sleep_for, 0.3, "late")
        wait_until(lambda: (observer.job_info(fut.job_id)[0] or {}).get("state") == "running",
                   what="the job to start")
        proxied.hold()  # the JOB_DONE will wait in the cut link ...
        wait_until(lambda: (observer.job_info(fut.job_id)[0] or {}).get("state") == "succeeded",
                   what="the job to finish")
        proxied.reset()  # ... and is lost with the connection
        proxied.release()
        assert fut.result(20) == "late"  # the dispatcher kept it (never acknowledged) and sent it again
    wait_until(lambda: observer.job_info(fut.job_id)[0] is None, what="the dispatcher to forget the delivered job")


def test_tcp_keepalive_guards_the_clients_connection_and_zmtp_heartbeats_are_off(cluster: Cluster) -> None:
    """The kernel tears down a half-open connection (keepalive probes, TCP_USER_TIMEOUT); ZMTP heartbeats
    stay off, since with them libzmq 4.3.5 can abort the process (transport/sockets.py, keep_links_alive).
    The cuts in test_link_faults.py show the teardown and the reconnection happen."""
    client = cluster.client()
    sock = client._conn._sock if client._conn is not None else None
    assert sock is not None
    assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 0
    assert sock.getsockopt(zmq.TCP_KEEPALIVE) == 1
    assert 1 <= sock.getsockopt(zmq.TCP_KEEPALIVE_IDLE) < sock.getsockopt(zmq.TCP_MAXRT) / 1000


def _lone_round_trip(scripted: ScriptedDispatcher, conn: Any, seq: int) -> None:
    future = conn.submit(conn.new_job_id(), _NO_OPTIONS, encode_value(seq))
    (job_id,) = _submitted_ids(scripted, 1)
    scripted.send(Cmd.JOB_DONE, *_done(seq, [(job_id, seq)]))
    future.result(10)


@pytest.fixture
def lone_connection(scripted: ScriptedDispatcher, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A connection that never pings during the test (a ping acknowledges too) and, unless a test says
    otherwise, holds an ACK back for as long as the test runs."""
    monkeypatch.setattr(connection, "ACK_DELAY_S", 60.0)
    conn = connection.Connection(scripted.address, heartbeat_interval_s=30.0)
    conn.connect(10)
    try:
        yield conn
    finally:
        conn.close()


def test_the_ack_of_a_lone_round_trip_goes_out_with_the_next_submit(
    scripted: ScriptedDispatcher, lone_connection: Any
) -> None:
    _lone_round_trip(scripted, lone_connection, 1)
    lone_connection.submit(lone_connection.new_job_id(), _NO_OPTIONS, encode_value(2))
    submit = scripted.expect(Cmd.SUBMIT)
    ack = scripted.expect(Cmd.ACK)
    assert ack.body == {"seq": 1}
    at = scripted.received.index(ack)
    assert scripted.received.index(submit) == at - 1, scripted.received  # with it, never on its own before it


def test_an_ack_with_nothing_to_go_with_leaves_on_its_own(
    scripted: ScriptedDispatcher, lone_connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "ACK_DELAY_S", 0.05)
    _lone_round_trip(scripted, lone_connection, 1)
    assert scripted.expect(Cmd.ACK).body == {"seq": 1}


def test_closing_acknowledges_what_arrived(scripted: ScriptedDispatcher, lone_connection: Any) -> None:
    _lone_round_trip(scripted, lone_connection, 1)
    lone_connection.close()
    assert scripted.expect(Cmd.ACK).body == {"seq": 1}  # else the dispatcher keeps the job for its result TTL


@pytest.mark.parametrize("patience_s", [5.0, 126.0, 600.0, 3600.0])
def test_links_with_a_long_patience_still_connect(patience_s: float) -> None:
    """Heartbeats minutes apart (`--heartbeat-interval 60 --liveness 3`) mean keepalive over minutes: more
    probes than the kernel takes (TCP_KEEPCNT 127), which once made libzmq fail every connection."""
    ctx: zmq.Context[Any] = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        for sock in (router, dealer):
            sock.setsockopt(zmq.LINGER, 0)
            keep_links_alive(sock, patience_s)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hello")
        assert router.poll(10_000), "the connection was never made"
        assert router.recv_multipart()[1] == b"hello"
        assert dealer.getsockopt(zmq.TCP_KEEPALIVE_CNT) <= 127
    finally:
        router.close()
        dealer.close()
        ctx.term()
