"""A standby pair of real dispatcher processes on 127.0.0.1 (docs/standby.md): start, ship, fail over, fence.

Each test starts two `conveyor dispatcher --peer` processes (and a worker, a witness, clients as it
needs), waits on conditions with deadlines, and checks the journals' files directly with sqlite3.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from conveyor import Client
from conveyor.protocol import Cmd, encode
from conveyor.protocol import commands as c
from conveyor.protocol.frames import frame_epoch, split
from conveyor.transport.failover import Failover
from tests.conftest import ROOT, Cluster, conveyor_cmd, stop_process, wait_until
from tests.test_cli import assert_one_error_line

FAILOVER_S = 1.0  # --failover-timeout: short, so that a failover test takes seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pair:
    """Two dispatchers (primary, backup), optionally a witness, and workers, as real processes."""

    def __init__(self, tmp: Path, witness: bool = False, keys: Path | None = None):
        self.tmp = tmp
        self.keys = keys
        ports = [free_port() for _ in range(5)]
        self.addr = {"primary": f"tcp://127.0.0.1:{ports[0]}", "backup": f"tcp://127.0.0.1:{ports[1]}"}
        self.pair_addr = {"primary": f"tcp://127.0.0.1:{ports[2]}", "backup": f"tcp://127.0.0.1:{ports[3]}"}
        self.witness_addr = f"tcp://127.0.0.1:{ports[4]}" if witness else None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.clients: list[Client] = []
        if self.witness_addr is not None:
            keys_args = ["--keys", str(keys)] if keys is not None else []
            self._spawn("witness", ["witness", "--bind", self.witness_addr, "--state", str(tmp / "witness.epoch"),
                                    "--failover-timeout", str(FAILOVER_S), *keys_args])

    @property
    def addresses(self) -> list[str]:
        return [self.addr["primary"], self.addr["backup"]]

    def journal(self, role: str) -> Path:
        return self.tmp / f"{role}.db"

    def start(self, role: str, *extra: str) -> None:
        other = "backup" if role == "primary" else "primary"
        args = ["dispatcher", "--bind", self.addr[role], "--journal", str(self.journal(role)), "--role", role,
                "--peer", self.pair_addr[other], "--pair-bind", self.pair_addr[role],
                "--failover-timeout", str(FAILOVER_S), "--heartbeat-interval", "0.2", *extra]
        if self.witness_addr is not None:
            args += ["--witness", self.witness_addr]
        if self.keys is not None:
            args += ["--keys", str(self.keys)]
        self._spawn(role, args)

    def start_worker(self, name: str = "w1", concurrency: int = 4) -> None:
        self._spawn(name, ["worker", "--connect", ",".join(self.addresses), "--mode", "threads",
                           "--concurrency", str(concurrency), "--name", name, "--heartbeat-interval", "0.2"])

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.procs[name] = subprocess.Popen(conveyor_cmd(*args), stdout=log, stderr=log, cwd=ROOT, env=env)

    def client(self, **kwargs: Any) -> Client:
        client = Client(self.addresses, **kwargs)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for proc in self.procs.values():
            with _suppress_lookup():
                os.kill(proc.pid, signal.SIGCONT)
            stop_process(proc)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log"))


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is ProcessLookupError


def probe(address: str, timeout_s: float = 1.0) -> tuple[str, int] | None:
    """("active" | "passive", epoch) of a dispatcher, from one STATUS on a raw socket (a REDIRECT means
    passive). Asking is a client's vote, as it would be for any client."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(encode(Cmd.STATUS, {"req": 1}))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        parts = sock.recv_multipart()
        cmd, raw, _ = split(parts)
        body = c.decode_body(cmd, raw)
        if cmd == Cmd.REDIRECT:
            return "passive", body.epoch
        pair = body.dispatcher.get("pair", {})
        return pair.get("state", "?"), frame_epoch(parts[1])
    finally:
        sock.close()


def jobs_in(db: Path) -> dict[str, str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT id, state FROM jobs").fetchall())


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.stop()


def _started(p: Pair) -> None:
    p.start("primary")
    p.start("backup")
    wait_until(lambda: probe(p.addr["primary"]) == ("active", 1), 20, 0.1, "the primary to be active in epoch 1")


def test_pair_starts_primary_active_backup_passive_and_accepted_jobs_are_in_both_journals(pair: Pair) -> None:
    _started(pair)
    assert probe(pair.addr["backup"]) == ("passive", 1)
    wait_until(lambda: pair.client().status()["dispatcher"]["pair"]["replication"] == "in-sync", 10, 0.1)
    client = pair.clients[0]
    futures = [client.options(keep=True).submit("tests.tasks:add", i, 1) for i in range(50)]
    client._conn.wait_accepted(futures, 20)  # type: ignore[union-attr]
    assert all(f._accepted for f in futures)
    ids = {f.job_id for f in futures}
    # ACCEPTED arrived: both journals hold every one of these jobs already (nothing is waited for here).
    assert ids <= set(jobs_in(pair.journal("primary"))), "an acknowledged job is missing from the primary"
    assert ids <= set(jobs_in(pair.journal("backup"))), "an acknowledged job is missing from the backup"
    status = client.status()["dispatcher"]["pair"]
    assert status["state"] == "active" and status["replication"] == "in-sync", status


def test_kill_9_of_the_active_backup_takes_over_and_every_acknowledged_job_finishes(pair: Pair, tmp_path: Path) -> None:
    _started(pair)
    pair.start_worker()
    wait_until(lambda: pair.client().status()["dispatcher"]["pair"]["replication"] == "in-sync", 10, 0.1)
    # Detached jobs: a client process submits, waits for ACCEPTED, prints the ids and exits.
    script = (
        "import sys; from conveyor import Client\n"
        f"c = Client({pair.addresses!r}, connect_timeout=10)\n"
        "fs = [c.options(keep=True).submit('tests.tasks:sleep_for', 0.2, i) for i in range(30)]\n"
        "c._conn.wait_accepted(fs, 20)\n"
        "assert all(f._accepted for f in fs)\n"
        "print(' '.join(f.job_id for f in fs)); c.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=60, check=True)
    detached = out.stdout.decode().split()
    assert len(detached) == 30
    client = pair.clients[0]
    connected = [client.options(keep=True).submit("tests.tasks:sleep_for", 0.2, 100 + i) for i in range(30)]
    client._conn.wait_accepted(connected, 20)  # type: ignore[union-attr]
    assert set(detached) <= set(jobs_in(pair.journal("backup")))
    killed_at = time.monotonic()
    os.kill(pair.procs["primary"].pid, signal.SIGKILL)
    wait_until(lambda: probe(pair.addr["backup"], 0.5) == ("active", 2), 30, 0.05, "the backup to take over")
    took = time.monotonic() - killed_at
    assert took < FAILOVER_S + 5, took
    assert sorted(f.result(timeout=60) for f in connected) == list(range(100, 130))
    fetch = Client(pair.addresses, connect_timeout=10)
    pair.clients.append(fetch)
    assert sorted(fetch.result(job_id, timeout=60) for job_id in detached) == list(range(30))
    assert client._conn.failover.seen == 2  # type: ignore[union-attr]
    # The old primary comes back passive (fail-back is never automatic) and gets the journal again.
    pair.procs["primary"].wait()
    pair.start("primary")
    wait_until(lambda: probe(pair.addr["primary"], 0.5) == ("passive", 2), 20, 0.1, "the old primary, passive")
    assert probe(pair.addr["backup"]) == ("active", 2)
    wait_until(lambda: set(detached) <= set(jobs_in(pair.journal("primary"))), 20, 0.1, "the snapshot")


def test_sigstop_of_the_active_then_sigcont_it_steps_down_and_its_stale_messages_are_refused(pair: Pair) -> None:
    _started(pair)
    # A peer of the primary on a raw socket, fenced like a client: it pings the primary all along.
    fence = Failover(pair.addresses)
    ctx = zmq.Context.instance()
    old = ctx.socket(zmq.DEALER)
    old.setsockopt(zmq.LINGER, 0)
    old.connect(pair.addr["primary"])
    try:
        old.send_multipart(encode(Cmd.HELLO, {"client": "raw"}))
        assert old.poll(5000)
        assert fence.admit(old.recv_multipart()[1]) and fence.seen == 1
        os.kill(pair.procs["primary"].pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # A client's asking is the vote: the backup takes over once the primary was silent long enough.
        wait_until(lambda: probe(pair.addr["backup"], 0.5) == ("active", 2), 20, 0.05, "the backup to take over")
        # The peer's silence counts from its last beat: one beat (FAILOVER_S / 4) before the stop, later if beats lag.
        assert time.monotonic() - stopped_at >= FAILOVER_S * 0.5  # a beat may come late on a loaded machine
        fence.seen = max(fence.seen, 2)  # the raw peer has obeyed the new active (as a client would)
        for _ in range(5):  # pings queued while the primary is frozen: answered after SIGCONT, in epoch 1
            old.send_multipart(encode(Cmd.HEARTBEAT, c.Heartbeat("client"), epoch=fence.seen))
        os.kill(pair.procs["primary"].pid, signal.SIGCONT)
        obeyed = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if not old.poll(200):
                continue
            parts = old.recv_multipart()
            if parts[1][:1] == bytes((Cmd.REDIRECT,)):  # it has stepped down: advice, not work
                continue
            if fence.admit(parts[1]):
                obeyed += 1
            else:
                old.send_multipart(encode(Cmd.STALE, fence.stale_reply(), epoch=fence.seen))
        assert obeyed == 0, "a message of the stale primary was obeyed"
        # It steps down and starts again passive; the backup stays active.
        wait_until(lambda: probe(pair.addr["primary"], 0.5) == ("passive", 2), 20, 0.1, "the old primary to step down")
        assert probe(pair.addr["backup"]) == ("active", 2)
        log = (pair.tmp / "primary.log").read_text()
        assert "stepping down" in log
        print(f"stale messages refused: {fence.stale}")
    finally:
        old.close()


def test_with_a_witness_kill_9_of_the_active_fails_over_without_a_client(tmp_path: Path) -> None:
    p = Pair(tmp_path, witness=True)
    try:
        p.start("primary")
        p.start("backup")
        wait_until(lambda: _pair_state(p, "primary") == "active", 20, 0.1, "the primary to be active")
        os.kill(p.procs["primary"].pid, signal.SIGKILL)
        # No client asks the backup: the witness's lease is the vote.
        wait_until(lambda: "active in epoch 2" in (tmp_path / "backup.log").read_text(), 20, 0.05, "the takeover")
        assert (tmp_path / "witness.epoch").read_text().strip() == "2"
        assert probe(p.addr["backup"]) == ("active", 2)
    finally:
        p.stop()


def _pair_state(p: Pair, role: str) -> str | None:
    answer = probe(p.addr[role], 0.5)
    return None if answer is None else answer[0]


def test_failover_rules_follow_redirects_and_refuse_lower_epochs() -> None:
    f = Failover("tcp://a:1, tcp://b:2")
    assert f.addresses == ["tcp://a:1", "tcp://b:2"] and f.current == "tcp://a:1"
    assert f.admit(encode(Cmd.HEARTBEAT, c.Heartbeat(), epoch=3)[1]) and f.seen == 3
    assert not f.admit(encode(Cmd.ASSIGN, c.Assign(0, []), epoch=1)[1]) and f.stale == 1
    assert not f.admit(encode(Cmd.HEARTBEAT, c.Heartbeat())[1])  # no epoch at all: 0, below 3
    assert f.admit(encode(Cmd.REDIRECT, c.Redirect("", 1), epoch=1)[1])  # advice, read whatever its epoch
    f.redirected(c.Redirect("tcp://b:2", 4), now=10.0)
    assert f.seen == 4 and f.due(10.0, 10.0) == ("tcp://b:2", True)
    f.redirected(c.Redirect("", 4), now=11.0)  # it knows no active: ask it again, shortly
    assert f.due(11.0, 11.0) is None and f.due(12.0, 12.0) == ("tcp://b:2", False)
    assert f.due(20.0, 12.0) == ("tcp://a:1", True)  # silent for settle_s: the other one


def test_backup_gone_the_active_serves_degraded_and_catches_the_backup_up_when_it_returns(pair: Pair) -> None:
    _started(pair)
    client = pair.client()
    wait_until(lambda: client.status()["dispatcher"]["pair"]["replication"] == "in-sync", 10, 0.1)
    os.kill(pair.procs["backup"].pid, signal.SIGKILL)
    pair.procs["backup"].wait()
    wait_until(lambda: client.status()["dispatcher"]["pair"]["replication"] == "degraded", 10, 0.1, "degraded")
    futures = [client.options(keep=True).submit("tests.tasks:add", i, 1) for i in range(20)]
    client._conn.wait_accepted(futures, 20)  # type: ignore[union-attr]
    assert all(f._accepted for f in futures), "a degraded active still accepts"
    assert "DEGRADED" in (pair.tmp / "primary.log").read_text()
    pair.start("backup")
    wait_until(lambda: client.status()["dispatcher"]["pair"]["replication"] == "in-sync", 20, 0.1, "in sync again")
    ids = {f.job_id for f in futures}
    assert ids <= set(jobs_in(pair.journal("backup"))), "the returning backup did not catch up"


def test_with_require_backup_a_degraded_active_holds_new_jobs_until_the_backup_is_back(pair: Pair) -> None:
    """--require-backup: never acknowledged on one copy. Degraded, SUBMIT answers busy (the client sends
    again), so the jobs are in neither journal; the backup back and in sync, they are accepted in both."""
    pair.start("primary", "--require-backup")
    pair.start("backup", "--require-backup")
    client = pair.client()

    def replication() -> dict[str, Any]:
        return dict(client.status()["dispatcher"]["pair"])

    def accepted(futures: list[Any]) -> set[str]:
        client._conn.wait_accepted(futures, 30)  # type: ignore[union-attr]
        assert all(f._accepted for f in futures)
        return {f.job_id for f in futures}

    wait_until(lambda: replication()["replication"] == "in-sync", 20, 0.1, "in sync")
    first = [client.submit("tests.tasks:add", 1, 1)]
    assert accepted(first) <= set(jobs_in(pair.journal("backup")))  # in sync: as without the option
    os.kill(pair.procs["backup"].pid, signal.SIGKILL)
    pair.procs["backup"].wait()
    wait_until(lambda: replication()["replication"] == "degraded", 10, 0.1, "degraded")
    futures = [client.submit("tests.tasks:add", i, 1) for i in range(10)]
    wait_until(lambda: replication()["held_back"] >= 10, 10, 0.1, "the new jobs held back")
    assert not any(f._accepted or f.done() for f in futures), "acknowledged on one copy"
    ids = {f.job_id for f in futures}
    assert not ids & set(jobs_in(pair.journal("primary")))
    shown = subprocess.run(conveyor_cmd("status", "--dispatcher", pair.addr["primary"]), cwd=ROOT,
                           capture_output=True, text=True, timeout=30)
    assert "new jobs wait (--require-backup)" in shown.stdout, shown.stdout + shown.stderr
    assert "new jobs wait (--require-backup)" in (pair.tmp / "primary.log").read_text()
    pair.start("backup", "--require-backup")
    assert accepted(futures) == ids  # the client sent them again; ACCEPTED once both journals hold them
    assert ids <= set(jobs_in(pair.journal("backup"))) and ids <= set(jobs_in(pair.journal("primary")))
    pair.start_worker()
    assert [f.result(30) for f in futures] == [i + 1 for i in range(10)] and first[0].result(30) == 2
    alone = subprocess.run(conveyor_cmd("dispatcher", "--require-backup", "--no-journal"), cwd=ROOT,
                           capture_output=True, text=True, timeout=30)
    assert "--require-backup needs --peer" in assert_one_error_line(alone, 2)


def test_the_epoch_rides_in_the_command_frame_plain_or_packed() -> None:
    from conveyor.errors import ProtocolError

    for frames in ([], [b"x" * 10], [b"a", b"b", b"c"]):
        parts = encode(Cmd.ASSIGN, c.Assign(0, []), frames, epoch=2**40 + 7)
        cmd, _, got = split(parts)
        assert cmd == Cmd.ASSIGN and got == frames and frame_epoch(parts[1]) == 2**40 + 7
    assert frame_epoch(encode(Cmd.ASSIGN, c.Assign(0, []))[1]) == 0
    bad = encode(Cmd.HEARTBEAT, c.Heartbeat(), epoch=3)
    bad[1] = bytes((Cmd.HEARTBEAT, 0)) + bad[1][2:]  # eight epoch bytes without the EPOCH flag
    with pytest.raises(ProtocolError):
        split(bad)


def test_with_keys_the_pair_link_and_the_witness_are_curve_and_accept_the_dispatcher_key_only(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    subprocess.run(conveyor_cmd("keys", "init", str(keys)), cwd=ROOT, check=True, capture_output=True)
    p = Pair(tmp_path, witness=True, keys=keys)  # with a witness, the primary serves only on its lease
    try:
        p.start("primary")
        p.start("backup")
        client = p.client(keys=str(keys), connect_timeout=10)
        wait_until(lambda: client.status()["dispatcher"]["pair"]["replication"] == "in-sync", 20, 0.1, "in sync")
        futures = [client.options(keep=True).submit("tests.tasks:add", i, 1) for i in range(10)]
        client._conn.wait_accepted(futures, 20)  # type: ignore[union-attr]
        assert {f.job_id for f in futures} <= set(jobs_in(p.journal("backup")))
        # A client's key cannot reach the pair's socket: the handshake is refused.
        from conveyor.security.keys import load_peer_credentials

        creds = load_peer_credentials(keys, "client")
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.CURVE_SECRETKEY, creds.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, creds.public)
        sock.setsockopt(zmq.CURVE_SERVERKEY, creds.server_public)
        sock.connect(p.pair_addr["backup"])
        sock.send_multipart(encode(Cmd.PAIR_ACK, c.PairAck(1, 99)))
        try:
            wait_until(lambda: "not the dispatcher's" in (tmp_path / "backup.log").read_text(), 10, 0.1, "a refusal")
        finally:
            sock.close()
        # The active renews its lease with the witness over CURVE (a fresh witness grants after one lease).
        epoch_file = tmp_path / "witness.epoch"
        wait_until(lambda: epoch_file.exists() and epoch_file.read_text().strip() == "1", 20, 0.1,
                   "the witness to grant the primary's lease")
        # Nor can a client key reach the witness: it cannot ask for a lease.
        assert p.witness_addr is not None
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.CURVE_SECRETKEY, creds.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, creds.public)
        sock.setsockopt(zmq.CURVE_SERVERKEY, creds.server_public)
        sock.connect(p.witness_addr)
        sock.send_multipart(encode(Cmd.LEASE, c.Lease("intruder", 99, 1)))
        try:
            wait_until(lambda: "not the dispatcher's" in (tmp_path / "witness.log").read_text(), 10, 0.1,
                       "the witness to refuse a client key")
        finally:
            sock.close()
        assert epoch_file.read_text().strip() == "1"  # never 99
    finally:
        p.stop()


def _detached(addresses: list[str], n: int, offset: int = 0) -> list[str]:
    """Submit n jobs from a client process that exits once they are acknowledged; their ids."""
    script = (
        "from conveyor import Client\n"
        f"c = Client({addresses!r}, connect_timeout=10)\n"
        f"fs = [c.options(keep=True).submit('tests.tasks:sleep_for', 0.05, {offset} + i) for i in range({n})]\n"
        "c._conn.wait_accepted(fs, 20)\n"
        "assert all(f._accepted for f in fs)\n"
        "print(' '.join(f.job_id for f in fs)); c.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=60, check=True)
    return out.stdout.decode().split()


def test_a_former_active_rejoins_passive_and_hands_over_what_only_its_journal_held(pair: Pair) -> None:
    _started(pair)
    client = pair.client()
    wait_until(lambda: client.status()["dispatcher"]["pair"]["replication"] == "in-sync", 10, 0.1)
    client.close()
    os.kill(pair.procs["backup"].pid, signal.SIGKILL)
    pair.procs["backup"].wait()
    wait_until(lambda: "DEGRADED" in (pair.tmp / "primary.log").read_text(), 10, 0.1, "degraded")
    only_primary = _detached(pair.addresses, 10)  # acknowledged with one copy: no worker runs them yet
    assert set(only_primary) <= set(jobs_in(pair.journal("primary")))
    os.kill(pair.procs["primary"].pid, signal.SIGKILL)
    pair.procs["primary"].wait()
    pair.start("backup")  # alone, without those jobs: it takes over (the probe is a client's vote)
    wait_until(lambda: probe(pair.addr["backup"], 0.5) == ("active", 2), 20, 0.1, "the backup to take over")
    assert not set(only_primary) & set(jobs_in(pair.journal("backup")))
    pair.start("primary")  # comes back passive and hands its unfinished jobs over
    wait_until(lambda: probe(pair.addr["primary"], 0.5) == ("passive", 2), 20, 0.1, "the old primary, passive")
    wait_until(lambda: set(only_primary) <= set(jobs_in(pair.journal("backup"))), 20, 0.1, "the handover")
    assert probe(pair.addr["backup"]) == ("active", 2)
    pair.start_worker()
    fetch = pair.client(connect_timeout=10)
    assert sorted(fetch.result(job_id, timeout=60) for job_id in only_primary) == list(range(10))


@pytest.mark.parametrize("witness", [False, True], ids=["no-witness", "witness"])
def test_promote_moves_the_active_role_to_the_backup_and_no_job_is_lost(tmp_path: Path, witness: bool) -> None:
    """`conveyor dispatcher promote`: fail-back (or a move before maintenance) is an operator's act. The
    active yields once the promoted one holds its journal; the promoted one activates in a higher epoch
    (with a witness: once the old active's lease has run out); the old one restarts passive."""
    p = Pair(tmp_path, witness=witness)
    try:
        _started(p)
        p.start_worker()
        client = p.client()
        wait_until(lambda: client.status()["dispatcher"]["pair"]["replication"] == "in-sync", 10, 0.1)
        before = [client.options(keep=True).submit("tests.tasks:sleep_for", 0.05, i) for i in range(40)]
        client._conn.wait_accepted(before, 20)  # type: ignore[union-attr]
        promote = conveyor_cmd("dispatcher", "promote", "-d", p.addr["backup"], "--timeout", "30")
        asked_at = time.monotonic()
        moved = subprocess.run(promote, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
        assert moved.returncode == 0, (moved.stdout, moved.stderr, p.logs())
        print(f"promote ({'witness' if witness else 'no witness'}): the backup active "
              f"{time.monotonic() - asked_at:.2f} s after the command started")
        assert moved.stdout.strip() == f"{p.addr['backup']}: active (backup) in epoch 2", moved.stdout
        wait_until(lambda: probe(p.addr["primary"], 0.5) == ("passive", 2), 20, 0.1, "the old primary, passive")
        assert probe(p.addr["backup"]) == ("active", 2)
        after = [client.options(keep=True).submit("tests.tasks:sleep_for", 0.01, i) for i in range(40, 60)]
        # Each future resolves once with its own value. The client may be sent some results again
        # (`duplicate_results`, dropped): the new active restores finished jobs from its journal and does
        # not know which JOB_DONE the old one had delivered (acknowledgements are not journaled).
        assert sorted(f.result(timeout=60) for f in before + after) == list(range(60))
        again = subprocess.run(promote, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
        assert again.returncode == 0 and "epoch 2" in again.stdout, (again.stdout, again.stderr)  # already active
    finally:
        p.stop()


def test_promote_of_a_dispatcher_that_is_not_in_a_pair_is_refused_in_one_line(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    cluster.start_dispatcher()
    try:
        res = subprocess.run(conveyor_cmd("dispatcher", "promote", "-d", cluster.address), capture_output=True,
                             text=True, cwd=ROOT, timeout=60, check=False)
        assert "not one of a standby pair" in assert_one_error_line(res, 1)
    finally:
        cluster.stop()


def test_failover_counts_silence_from_the_start_and_leaves_a_passive_that_names_no_active() -> None:
    """Two defects found by tests/test_standby_netns.py: a new client went to its second address at its first
    turn (silence counted from 0), and a client at a passive that knows no active (cut off from its peer)
    asked it again forever while the active served at the other address."""
    f = Failover("tcp://b:2, tcp://a:1", settle_s=2.0)
    f.started(100.0)
    assert f.due(100.5, 0.0) is None  # nothing heard yet, but only 0.5 s since we started
    f.redirected(c.Redirect("", 1), now=100.5)  # b is passive and does not hear its peer
    assert f.due(100.75, 100.5) == ("tcp://b:2", False)  # asked again (the vote of a pair without a witness)
    f.redirected(c.Redirect("", 1), now=101.5)
    assert f.due(101.75, 101.5) == ("tcp://b:2", False)
    f.redirected(c.Redirect("", 1), now=102.6)  # settle_s of "no active known": the other address
    assert f.due(102.6, 102.6) == ("tcp://a:1", True)
    assert f.admit(encode(Cmd.HEARTBEAT, c.Heartbeat(), epoch=1)[1])  # a serves
    f.redirected(c.Redirect("", 1), now=110.0)  # a fresh stretch of "no active" starts again from here
    assert f.due(110.25, 110.0) == ("tcp://a:1", False)
