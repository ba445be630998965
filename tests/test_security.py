"""Security (docs/security.md): CurveZMQ keys, roles, revocation, safe binding, bounded frames.

Everything runs as real processes on 127.0.0.1; "raw" peers are plain DEALER sockets speaking the
protocol by hand, so that a peer can do what the reference client and worker never would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from conveyor import AccessDenied, Client
from conveyor.dispatcher import Dispatcher
from conveyor.errors import InsecureBindError
from conveyor.protocol import Cmd, Message, decode, encode
from conveyor.security.bind import is_loopback
from conveyor.security.keys import PeerCredentials, load_peer_credentials, write_pair
from conveyor.transport.sockets import configure_socket
from tests import tasks
from tests.conftest import ROOT, Cluster, conveyor_cmd, stop_process, wait_until
from tests.test_cli import assert_ok, assert_one_error_line, run_cli

REFUSE_WITHIN = 5.0  # seconds: a refused client must fail well before its connect timeout


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    assert_ok(run_cli("keys", "init", str(directory)))
    return directory


@pytest.fixture
def secure(tmp_path: Path, keys: Path) -> Iterator[Cluster]:
    """A dispatcher that requires keys from `keys` (no workers yet)."""
    c = Cluster(tmp_path)
    c.start_dispatcher("--keys", str(keys))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def foreign_keys(main: Path, target: Path) -> Path:
    """A key directory whose worker and client keys the dispatcher of `main` has never seen."""
    target.mkdir()
    shutil.copy(main / "dispatcher.key", target / "dispatcher.key")
    write_pair(target, "worker")
    write_pair(target, "client")
    return target


def swapped_keys(main: Path, target: Path) -> Path:
    """main's worker key presented as a client key, and its client key presented as a worker key."""
    target.mkdir()
    shutil.copy(main / "dispatcher.key", target / "dispatcher.key")
    shutil.copy(main / "worker.key_secret", target / "client.key_secret")
    shutil.copy(main / "client.key_secret", target / "worker.key_secret")
    return target


def raw_peer(ctx: zmq.Context[Any], address: str, credentials: PeerCredentials | None) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    configure_socket(sock, credentials, 1 << 20)
    sock.connect(address)
    return sock


def replies(sock: zmq.Socket[Any], timeout: float = 1.5) -> list[Message]:
    """Every message that arrives within `timeout` seconds."""
    out = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            out.append(decode(sock.recv_multipart()))
    return out


READY_BODY = {"name": "intruder", "host": "127.0.0.1", "pid": 1, "mode": "threads", "concurrency": 4, "credit": 4}


def submit_message(job_id: str) -> list[Any]:
    from conveyor.protocol.payload import encode_call

    frames = encode_call("tests.tasks:noop", None, ("pwned",), {})
    return encode(Cmd.SUBMIT, [[job_id, {"fn": "tests.tasks:noop"}, len(frames)]], frames)


def keyed_status(c: Cluster, keys: Path) -> dict[str, Any]:
    with Client(c.address, keys=keys, connect_timeout=10) as client:
        return client.status()


def start_worker(c: Cluster, name: str, keys: Path | None) -> str:
    extra = ["--keys", str(keys)] if keys is not None else []
    return c.start_worker("threads", 2, None, name, *extra)


# --- key files ----------------------------------------------------------------------------------------


def test_keys_init_makes_one_directory_for_all_three_roles(tmp_path: Path) -> None:
    d = tmp_path / "k"
    out = assert_ok(run_cli("keys", "init", str(d)))
    assert "conveyor keys add-worker" in out
    for name in ("dispatcher", "worker", "client"):
        assert stat.S_IMODE((d / f"{name}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((d / f"{name}.key").stat().st_mode) == 0o644
        public, secret = zmq.auth.load_certificate(d / f"{name}.key_secret")  # zmq's own format
        assert secret is not None and zmq.curve_public(secret) == public
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert (d / "authorized/workers/worker.key").read_bytes() != (d / "authorized/clients/client.key").read_bytes()
    assert zmq.auth.load_certificate(d / "authorized/workers/worker.key")[0] == zmq.auth.load_certificate(
        d / "worker.key"
    )[0]
    # never overwrites
    before = (d / "dispatcher.key_secret").read_bytes()
    line = assert_one_error_line(run_cli("keys", "init", str(d)), 1)
    assert "already" in line
    assert (d / "dispatcher.key_secret").read_bytes() == before


def test_keys_add_worker_and_client(tmp_path: Path, keys: Path) -> None:
    old = os.umask(0)  # modes must not depend on the caller's umask
    try:
        out = assert_ok(run_cli("keys", "add-worker", str(keys), "gpu-1"))
    finally:
        os.umask(old)
    host = keys / "hosts" / "gpu-1"
    assert f"{host}" in out
    assert stat.S_IMODE((host / "worker.key_secret").stat().st_mode) == 0o600
    assert (host / "dispatcher.key").read_bytes() == (keys / "dispatcher.key").read_bytes()
    assert (keys / "authorized/workers/gpu-1.key").exists()
    assert load_peer_credentials(host, "worker").public == zmq.auth.load_certificate(host / "worker.key")[0]

    # an existing public key, as a bare Z85 line
    public, _ = zmq.curve_keypair()
    (tmp_path / "laptop.pub").write_bytes(public + b"\n")
    assert_ok(run_cli("keys", "add-client", str(keys), "laptop", "--public-key", str(tmp_path / "laptop.pub")))
    assert zmq.auth.load_certificate(keys / "authorized/clients/laptop.key")[0] == public
    assert not (keys / "hosts" / "laptop").exists()

    listing = assert_ok(run_cli("keys", "list", str(keys)))
    assert "gpu-1" in listing and "laptop" in listing and public.decode() in listing

    assert "already" in assert_one_error_line(run_cli("keys", "add-worker", str(keys), "gpu-1"), 1)
    assert "bad name" in assert_one_error_line(run_cli("keys", "add-client", str(keys), "../x"), 1)
    (tmp_path / "junk.pub").write_text("not a key\n")
    line = assert_one_error_line(
        run_cli("keys", "add-client", str(keys), "junk", "--public-key", str(tmp_path / "junk.pub")), 1
    )
    assert "not a CurveZMQ key" in line


def test_missing_keys_are_one_clear_error_line(tmp_path: Path, keys: Path) -> None:
    line = assert_one_error_line(
        run_cli("dispatcher", "--bind", "tcp://127.0.0.1:0", "--no-journal", "--keys", str(tmp_path / "nope")), 1
    )
    assert "conveyor keys init" in line
    host = tmp_path / "bundle"
    host.mkdir()
    shutil.copy(keys / "dispatcher.key", host)
    line = assert_one_error_line(run_cli("worker", "--connect", "tcp://127.0.0.1:9", "--keys", str(host)), 1)
    assert "worker.key_secret" in line


# --- authenticated traffic --------------------------------------------------------------------------


def test_authorized_worker_and_client_run_jobs_over_curve(secure: Cluster, keys: Path) -> None:
    client = secure.client(keys=keys)
    start_worker(secure, "w1", keys)
    status = secure.wait_for_workers("w1")
    assert client.submit(tasks.add, 2, 3).result(30) == 5
    # CurveZMQ on both ends: the client's socket, and the dispatcher's ROUTER (as it reports it)
    assert client._conn._sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
    assert status["security"]["mechanism"] == "CURVE"
    assert status["security"]["authorized"] == {"workers": 1, "clients": 1}
    # the CLI, with --keys and with CONVEYOR_KEYS
    assert_ok(run_cli("status", "--json", "--dispatcher", secure.address, "--keys", str(keys)))
    out = assert_ok(run_cli("submit", "--wait", "tests.tasks:add", "4", "5", address=secure.address,
                            env={"CONVEYOR_KEYS": str(keys)}))
    assert out.strip() == "9"


def test_local_cluster_with_keys(keys: Path) -> None:
    with Client(keys=keys, local_mode="threads", local_concurrency=2) as client:
        assert client.submit(tasks.add, 1, 1).result(30) == 2
        assert client.status()["security"]["mechanism"] == "CURVE"


def test_peer_without_keys_cannot_connect(secure: Cluster, keys: Path, zctx: zmq.Context[Any]) -> None:
    started = time.monotonic()
    with pytest.raises(AccessDenied, match="requires keys"):
        Client(secure.address, connect_timeout=20)
    assert time.monotonic() - started < REFUSE_WITHIN
    line = assert_one_error_line(run_cli("status", "--dispatcher", secure.address), 1)
    assert "requires keys" in line

    # a raw peer without keys: nothing it sends reaches the dispatcher
    sock = raw_peer(zctx, secure.address, None)
    sock.send_multipart(submit_message("nokey-1"))
    sock.send_multipart(encode(Cmd.READY, READY_BODY))
    sock.send_multipart(encode(Cmd.WATCH, {"ids": ["nokey-1"]}))
    sock.send_multipart(encode(Cmd.STATUS, {"req": 1}))
    assert replies(sock) == []
    assert sock.getsockopt(zmq.MECHANISM) == zmq.NULL
    status = keyed_status(secure, keys)
    assert status["totals"]["submitted"] == 0 and status["workers"] == []


def test_unknown_keys_cannot_connect(
    tmp_path: Path, secure: Cluster, keys: Path, zctx: zmq.Context[Any]
) -> None:
    other = foreign_keys(keys, tmp_path / "other")
    started = time.monotonic()
    with pytest.raises(AccessDenied, match="refused this client's key"):
        Client(secure.address, keys=other, connect_timeout=20)
    assert time.monotonic() - started < REFUSE_WITHIN

    name = start_worker(secure, "stranger", other)
    for creds in (load_peer_credentials(other, "client"), load_peer_credentials(other, "worker")):
        sock = raw_peer(zctx, secure.address, creds)
        sock.send_multipart(submit_message("unknown-1"))
        sock.send_multipart(encode(Cmd.READY, READY_BODY))
        sock.send_multipart(encode(Cmd.STATUS, {"req": 1}))
        assert replies(sock) == []
    log = secure.tmp / f"worker-{name}.log"
    wait_until(lambda: "refused this worker's key" in log.read_text(), 20, what="the worker to log the refusal")
    status = keyed_status(secure, keys)
    assert status["workers"] == [] and status["totals"]["submitted"] == 0
    assert status["security"]["handshakes_refused"] >= 3
    assert stop_process(secure.workers.pop(name)) == 0


def test_roles_are_enforced(tmp_path: Path, secure: Cluster, keys: Path, zctx: zmq.Context[Any]) -> None:
    client = secure.client(keys=keys)
    start_worker(secure, "w1", keys)
    secure.wait_for_workers("w1")
    job = client.options(keep=True).submit(tasks.noop, "the secret result")
    assert job.result(30) == "the secret result"

    swapped = swapped_keys(keys, tmp_path / "swapped")
    # a worker key cannot act as a client: the Client fails at once with a clear error
    with pytest.raises(AccessDenied, match="worker key 'worker' may not send HELLO"):
        Client(secure.address, keys=swapped, connect_timeout=20)

    worker_key = load_peer_credentials(swapped, "client")  # really the worker's key
    for message in (
        submit_message("by-a-worker-key"),
        encode(Cmd.WATCH, {"ids": [job.job_id]}),
        encode(Cmd.JOB_INFO, {"ids": [job.job_id], "req": 1}),
        encode(Cmd.STATUS, {"req": 2}),
    ):
        sock = raw_peer(zctx, secure.address, worker_key)  # a fresh peer each time: refusals are rate-limited
        sock.send_multipart(message)
        got = replies(sock, 1.0)
        assert [m.cmd for m in got] == [Cmd.ERROR], got
        assert got[0].body["code"] == "forbidden"
        sock.close()

    client_key = load_peer_credentials(swapped, "worker")  # really the client's key
    sock = raw_peer(zctx, secure.address, client_key)
    sock.send_multipart(encode(Cmd.READY, READY_BODY))
    got = replies(sock, 1.0)
    assert [(m.cmd, m.body["code"]) for m in got] == [(Cmd.ERROR, "forbidden")]
    assert "may not send READY" in got[0].body["message"]

    # a worker process holding a client key is refused and exits 1
    name = start_worker(secure, "impostor", swapped)
    assert secure.workers[name].wait(20) == 1
    assert "may not send READY" in (secure.tmp / f"worker-{name}.log").read_text()

    status = client.status()
    assert [w["name"] for w in status["workers"]] == ["w1"]
    assert status["totals"]["submitted"] == 1
    assert status["security"]["forbidden"] >= 6
    assert client.job_info(job.job_id)[0]["state"] == "succeeded"


def test_revocation_without_restart(tmp_path: Path, secure: Cluster, keys: Path) -> None:
    assert_ok(run_cli("keys", "add-client", str(keys), "c2"))
    assert_ok(run_cli("keys", "add-worker", str(keys), "w2"))
    c1 = secure.client(keys=keys)
    c2 = Client(secure.address, keys=keys / "hosts" / "c2", connect_timeout=10)
    try:
        assert c2.status()["security"]["authorized"] == {"workers": 2, "clients": 2}
        start_worker(secure, "w2", keys / "hosts" / "w2")
        secure.wait_for_workers("w2")
        job = c1.submit(tasks.sleep, 3.0)
        wait_until(lambda: (c1.job_info(job.job_id)[0] or {}).get("state") == "running", 15)

        revoked_at = time.monotonic()
        assert_ok(run_cli("keys", "revoke", str(keys), "client", "c2"))
        assert_ok(run_cli("keys", "revoke", str(keys), "worker", "w2"))
        # new connections with the revoked keys are refused at the handshake (which may be the first
        # to notice the change: live peers must be cut off all the same)
        with pytest.raises(AccessDenied, match="refused this client's key"):
            Client(secure.address, keys=keys / "hosts" / "c2", connect_timeout=20)

        # live connections: the revoked worker is told and exits, the revoked client's calls fail
        assert secure.workers["w2"].wait(15) == 1
        assert "was revoked" in (secure.tmp / "worker-w2.log").read_text()

        def c2_refused() -> bool:
            try:
                c2.status(timeout=2)
            except AccessDenied:
                return True
            return False

        wait_until(c2_refused, 15, what="the revoked client to be refused")
        assert time.monotonic() - revoked_at < 10
        # the job the revoked worker held runs again elsewhere; the other keys still work
        start_worker(secure, "w1", keys)
        assert job.result(30) == 3.0
        assert job.info["worker"] == "w1" and job.info["attempts"] == 2
        status = c1.status()
        assert status["security"]["revoked"] >= 2
        assert status["security"]["authorized"] == {"workers": 1, "clients": 1}
    finally:
        c2.close()


# --- safe by default ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True), ("tcp://127.1.2.3:0", True), ("tcp://[::1]:5555", True),
        ("tcp://localhost:5555", True), ("inproc://x", True), ("ipc:///tmp/x", True),
        ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://10.0.0.1:5555", False),
        ("tcp://[::]:5555", False), ("tcp://eth0:5555", False), ("tcp://example.com:5555", False),
        ("ws://127.0.0.1:5555", False), ("tcp://127.0.0.1.evil.com:5555", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_nonloopback_bind_without_keys_is_refused(tmp_path: Path, keys: Path) -> None:
    for address in ("tcp://0.0.0.0:0", "tcp://*:0"):
        line = assert_one_error_line(run_cli("dispatcher", "--bind", address, "--no-journal"), 2)
        assert line.startswith(f"error: refusing to listen on {address} without keys")
        assert "conveyor keys init" in line and "--insecure" in line
    line = assert_one_error_line(run_cli("up", "--bind", "tcp://0.0.0.0:0", "--workers", "1"), 2)
    assert "refusing to listen" in line
    with pytest.raises(InsecureBindError):
        Dispatcher("tcp://0.0.0.0:0").bind()

    # --insecure starts, and warns at every start; keys need no --insecure and print no warning
    for extra, warned in ((["--insecure"], True), (["--insecure"], True), (["--keys", str(keys)], False)):
        err = tmp_path / "stderr.txt"
        with open(err, "wb") as stderr:
            proc = subprocess.Popen(
                conveyor_cmd("dispatcher", "--bind", "tcp://0.0.0.0:0", "--no-journal", *extra),
                stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT,
            )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().decode().startswith("tcp://0.0.0.0:")
        finally:
            stop_process(proc)
            assert proc.stdout is not None
            proc.stdout.close()
        warnings = [x for x in err.read_text().splitlines() if x.startswith("warning: --insecure")]
        assert len(warnings) == (1 if warned else 0), err.read_text()
        if warned:
            assert "unauthenticated, unencrypted" in warnings[0]


# --- bounded frames -----------------------------------------------------------------------------------


def test_frames_over_max_message_size_are_refused_before_sending(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    c.start_dispatcher("--max-message-mib", "1")
    try:
        c.start_worker("threads", 1, None, "w1", "--max-message-mib", "1")
        client = c.client(max_message_size=1 << 20)
        c.wait_for_workers("w1")
        with pytest.raises(ValueError, match="max_message_size"):
            client.submit(tasks.noop, b"x" * (2 << 20))
        too_big = client.submit("os:urandom", 2 << 20)  # the result does not fit: the task fails, clearly
        with pytest.raises(Exception, match="max_message_size"):
            too_big.result(30)
        assert len(client.submit("os:urandom", 512 << 10).result(30)) == 512 << 10
    finally:
        c.stop()


# --- what travels on the wire -------------------------------------------------------------------------


def _capture(tmp_path: Path, port: int, tag: str) -> tuple[subprocess.Popen[bytes], Path]:
    pcap = tmp_path / f"{tag}.pcap"
    log = open(tmp_path / f"tcpdump-{tag}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-U", "-s", "0", "-n", "-w", str(pcap), f"tcp port {port}"],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    log.close()
    wait_until(lambda: "listening on" in (tmp_path / f"tcpdump-{tag}.log").read_text() or proc.poll() is not None, 10)
    if proc.poll() is not None:
        pytest.skip(f"tcpdump cannot capture: {(tmp_path / f'tcpdump-{tag}.log').read_text().strip()}")
    return proc, pcap


def _round_trip_under_capture(tmp_path: Path, tag: str, keys: Path | None) -> bytes:
    marker = f"CONVEYOR-PLAINTEXT-MARKER-{tag}-{os.getpid()}"
    c = Cluster(tmp_path / tag)
    c.tmp.mkdir()
    extra = ["--keys", str(keys)] if keys is not None else []
    c.start_dispatcher(*extra)
    capture: subprocess.Popen[bytes] | None = None
    try:
        port = int(c.address.rsplit(":", 1)[1])
        capture, pcap = _capture(tmp_path, port, tag)
        client = c.client(keys=keys) if keys is not None else c.client()
        c.start_worker("threads", 1, None, "w1", *extra)
        c.wait_for_workers("w1")
        assert client.submit(tasks.noop, marker).result(30) == marker
        assert client.submit(tasks.noop, marker.encode() * 1000).result(30) == marker.encode() * 1000
        # tcpdump writes what it has read; on a loaded machine it may read late, and SIGINT drops what
        # it has not: wait until the file holds the traffic (the assertion below says if it never does).
        with contextlib.suppress(AssertionError):
            wait_until(lambda: pcap.exists() and pcap.stat().st_size > 10_000, 15, what="tcpdump to write")
    finally:
        if capture is not None:
            capture.send_signal(signal.SIGINT)
            capture.wait(10)
        c.stop()
    data = pcap.read_bytes()
    assert len(data) > 10_000, "the capture holds the traffic"
    return data if marker.encode() in data else b""


@pytest.mark.skipif(shutil.which("tcpdump") is None or os.geteuid() != 0, reason="needs tcpdump and root")
def test_traffic_is_encrypted(tmp_path: Path, keys: Path) -> None:
    # the control: without keys the marker travels in clear, so the capture does see payloads
    assert _round_trip_under_capture(tmp_path, "clear", None) != b""
    assert _round_trip_under_capture(tmp_path, "curve", keys) == b"", "a task payload travelled unencrypted"


def test_worker_refused_for_keys_mismatch_logs_why(tmp_path: Path, keys: Path) -> None:
    """A worker with keys against a dispatcher without them says so, instead of only 'unreachable'."""
    c = Cluster(tmp_path)
    c.start_dispatcher()
    try:
        name = start_worker(c, "keyed", keys)
        log = tmp_path / f"worker-{name}.log"
        wait_until(lambda: "does not use keys" in log.read_text(), 20, what="the mismatch to be logged")
        with Client(c.address) as client:
            assert client.status()["workers"] == []
    finally:
        c.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
