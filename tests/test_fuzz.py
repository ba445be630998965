"""Fuzzing: hostile input for the decoders (hypothesis) and for a live dispatcher (raw DEALER sockets).

The decoders may only raise what they document: ProtocolError (and its VersionMismatch) for frames and
values, FunctionNotFound for calls. The dispatcher must survive >= 10,000 random and mutated messages
with bounded memory, count the malformed ones, quarantine peers that keep sending garbage, and still
run normal jobs afterwards.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor import Client
from conveyor.errors import FunctionNotFound
from conveyor.protocol import SIGNATURE, Cmd, ProtocolError, decode, encode, split_frames
from conveyor.protocol.payload import CODEC_PICKLE, decode_call, decode_value, encode_call, encode_value
from tests import tasks
from tests.conftest import Cluster, wait_until

FUZZ_MESSAGES = 12_000
SEED = 20261124
RSS_GROWTH_LIMIT = 256 << 20  # bytes: generous; what matters is "not without bound"

# --- the messages a peer may legitimately send, to mutate ---------------------------------------------

NASTY: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, -0.0, math.inf, -math.inf, math.nan,
    "", "x" * 300, "\u00e9\u4e2d", b"", b"\x00\xff" * 10, [], {}, [1, 2, 3], {"a": 1}, {1: 2}, {None: None},
    [[[[[[[[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]]]]]]], ["j", 1, True, {}, 0], [["j", 1]], [None] * 50,
]


def _deep(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


NASTY += [_deep(500), {"ids": _deep(200)}, list(range(5000))]


def call_frames(rng: random.Random) -> list[Any]:
    """A call of a function no worker has: if a mutation still decodes, the worker only reports not_found."""
    return list(encode_call("fuzz.nowhere:noop", None, (rng.randint(0, 9), "arg"), {"k": rng.random()}))


def valid_message(rng: random.Random, job_ids: list[str]) -> list[Any]:
    job = rng.choice(job_ids)
    kind = rng.randrange(14)
    if kind == 0:
        body = {"name": f"fz-{rng.randrange(99)}", "host": "127.0.0.1", "pid": rng.randrange(1, 99999),
                "mode": rng.choice(["threads", "processes", "asyncio", "weird"]), "concurrency": rng.randrange(1, 9),
                "tags": ["a"], "credit": rng.randrange(0, 9), "running": [[job, 1]], "session": "s"}
        return encode(Cmd.READY, body)
    if kind == 1:
        value = encode_value(rng.random())
        outcomes = [[job, rng.randrange(1, 4), True, {"duration": 0.1}, len(value)]]
        return encode(Cmd.RESULTS, {"seq": rng.randrange(1, 6), "outcomes": outcomes}, value)
    if kind == 2:
        info = {"kind": rng.choice(["exception", "lost", "crashed"]), "type": "E", "message": "m", "retryable": True}
        return encode(Cmd.RESULTS, {"seq": rng.randrange(1, 6), "outcomes": [[job, 1, False, info, 0]]})
    if kind == 3:
        return encode(Cmd.GIVEBACK, [[job, rng.randrange(1, 4)]])
    if kind == 4:
        return encode(rng.choice([Cmd.LEAVING, Cmd.GOODBYE]), {})
    if kind == 5:
        return encode(Cmd.HELLO, {"client": "fuzz", "pid": 1, "req": rng.randrange(9)})
    if kind in (6, 7):
        entries, frames = [], []
        for _ in range(rng.randrange(1, 4)):
            data = call_frames(rng)
            new_id = f"fz-{rng.randrange(10**9):x}"
            job_ids.append(new_id)
            opts = {"fn": "fuzz.nowhere:noop", "retries": rng.randrange(3), "timeout": rng.choice([None, 5]),
                    "tags": rng.choice([[], ["a"]]), "keep": rng.random() < 0.5}
            entries.append([new_id, opts, len(data)])
            frames += data
        return encode(Cmd.SUBMIT, entries, frames)
    if kind == 8:
        return encode(Cmd.WATCH, {"ids": [job, "fz-unknown"]})
    if kind == 9:
        return encode(Cmd.CANCEL_JOBS, {"ids": [job], "req": 3})
    if kind == 10:
        return encode(Cmd.STATUS, {"req": 4})
    if kind == 11:
        return encode(Cmd.JOB_INFO, {"ids": [job], "req": 5})
    if kind == 12:
        return encode(Cmd.HEARTBEAT, {"role": rng.choice(["worker", "client", None])})
    cmd = rng.choice(list(Cmd))  # any command, including the dispatcher's own and newer ones
    return encode(cmd, rng.choice(NASTY))


def _mutate_body(rng: random.Random, body: Any) -> Any:
    """Replace one value somewhere in the structure with a nasty one."""
    if isinstance(body, dict) and body and rng.random() < 0.8:
        key = rng.choice(list(body))
        return {**body, key: _mutate_body(rng, body[key])}
    if isinstance(body, list) and body and rng.random() < 0.8:
        i = rng.randrange(len(body))
        return [*body[:i], _mutate_body(rng, body[i]), *body[i + 1 :]]
    return rng.choice(NASTY)


def mutate(rng: random.Random, frames: list[Any]) -> list[Any]:
    frames = [bytes(f) for f in frames]
    op = rng.randrange(9)
    if op == 0:  # flip bytes in one frame
        i = rng.randrange(len(frames))
        data = bytearray(frames[i])
        for _ in range(rng.randrange(1, 4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        frames[i] = bytes(data)
    elif op == 1:  # truncate one frame
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif op == 2:  # drop, duplicate or swap frames
        i, j = rng.randrange(len(frames)), rng.randrange(len(frames))
        choice = rng.randrange(3)
        if choice == 0:
            del frames[i]
        elif choice == 1:
            frames.insert(i, frames[j])
        else:
            frames[i], frames[j] = frames[j], frames[i]
    elif op in (3, 4):  # a structure-aware change of the body
        try:
            body = msgpack.unpackb(frames[2], raw=False, strict_map_key=False)
            frames[2] = msgpack.packb(_mutate_body(rng, body), use_bin_type=True)
        except Exception:
            frames[2] = msgpack.packb(rng.choice(NASTY), use_bin_type=True)
    elif op == 5:  # another protocol version, or no protocol at all
        frames[0] = rng.choice([b"CNV1", b"CNV3", b"CNV", b"HTTP", b"", SIGNATURE + b"x"])
    elif op == 6:  # an unknown or misplaced command byte
        frames[1] = rng.choice([bytes([rng.randrange(256)]), b"", b"\x21\x21"])
    elif op == 7:  # extra data frames
        frames += [rng.randbytes(rng.randrange(64)) for _ in range(rng.randrange(1, 5))]
    else:  # a body that is not msgpack, or truncated msgpack
        frames[2] = rng.randbytes(rng.randrange(1, 64)) if rng.random() < 0.5 else frames[2][:-1]
    return frames


def random_frames(rng: random.Random) -> list[bytes]:
    n = rng.randrange(0, 7)
    out = [rng.randbytes(rng.choice([0, 1, 4, 16, 200])) for _ in range(n)]
    if out and rng.random() < 0.5:
        out[0] = SIGNATURE
    if len(out) > 1 and rng.random() < 0.5:
        out[1] = bytes([rng.choice(list(Cmd))])
    return out or [b""]


def fuzz_messages(seed: int, n: int) -> Iterator[list[Any]]:
    rng = random.Random(seed)
    job_ids = ["fz-0"]
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            yield valid_message(rng, job_ids)
        elif r < 0.8:
            yield mutate(rng, valid_message(rng, job_ids))
        else:
            yield random_frames(rng)
        if len(job_ids) > 500:
            del job_ids[1:250]


# --- decoders (hypothesis) ----------------------------------------------------------------------------

FRAME = st.binary(max_size=64)
NICE_FRAMES = st.lists(FRAME, max_size=6)


def _only(allowed: tuple[type[BaseException], ...], fn: Callable[[], Any]) -> None:
    try:
        fn()
    except allowed:
        pass


@given(NICE_FRAMES)
@settings(max_examples=1500, deadline=None)
def test_decode_random_frames(frames: list[bytes]) -> None:
    _only((ProtocolError,), lambda: decode(frames))


@given(st.integers(0, 2**32 - 1), st.integers(0, 99))
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decode_mutated_messages(seed: int, kind: int) -> None:
    rng = random.Random(seed)
    message = mutate(rng, valid_message(rng, ["j-1"])) if kind else random_frames(rng)
    _only((ProtocolError,), lambda: decode(message))


@given(st.integers(0, 255), st.binary(max_size=200), st.lists(FRAME, max_size=3))
@settings(max_examples=1500, deadline=None)
def test_decode_value_random(codec: int, body: bytes, rest: list[bytes]) -> None:
    if codec == CODEC_PICKLE:
        codec = ord("m")  # unpickling arbitrary bytes is not a decoding question: only peers' own data is
    _only((ProtocolError,), lambda: decode_value([bytes([codec]) + body, *rest]))


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=1000, deadline=None)
def test_decode_value_mutated(seed: int) -> None:
    rng = random.Random(seed)
    value = rng.choice([[1, "a", {"b": b"x" * 70_000}], {"k": [1.5, None]}, list(range(30)), "text"])
    frames = mutate(rng, [*encode_value(value), b"", b""])[:-2] or [b""]
    if frames[0][:1] == bytes([CODEC_PICKLE]):
        return
    _only((ProtocolError,), lambda: decode_value(frames))


FN_NAMES = st.sampled_from(["tests.tasks:add", "tests.tasks:noop", "no_such_module_xyz:f", "tests.tasks:nope", ""])


@given(
    st.one_of(FN_NAMES, st.text(max_size=20).filter(lambda s: ":" not in s), st.integers(-(2**63), 2**63), st.none()),
    st.sampled_from([False, 0, 1, None, "x", 1.0]),
    st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.none()),
    st.lists(FRAME, max_size=3),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=1500, deadline=None)
def test_decode_call_random(fn: Any, by_value: Any, chunk: Any, rest: list[bytes], seed: int) -> None:
    rng = random.Random(seed)
    header = msgpack.packb([fn, by_value, chunk], use_bin_type=True)
    if rng.random() < 0.5:
        rest = [*encode_value(rng.choice([[[1], {}], [[1, 2], {"b": 0}], [[[1], {}]], [1], {}, [[], []], "x"])), *rest]
    frames = [header, *rest]
    if rng.random() < 0.3:
        frames = mutate(rng, [*frames, b"", b""])
    if len(frames) > 1 and frames[1][:1] == bytes([CODEC_PICKLE]):
        return
    header_value: Any = None
    try:
        header_value = msgpack.unpackb(bytes(frames[0]), raw=False)
    except Exception:
        pass
    if isinstance(header_value, list) and len(header_value) == 3 and header_value[1] is True:
        return  # a function sent by value is unpickled: whatever pickle raises (documented)
    _only((ProtocolError, FunctionNotFound), lambda: decode_call(frames))


@given(st.lists(st.one_of(st.integers(-3, 5), st.none(), st.text(max_size=2)), max_size=5), NICE_FRAMES)
@settings(max_examples=500, deadline=None)
def test_split_frames_random(counts: list[Any], frames: list[bytes]) -> None:
    _only((ProtocolError,), lambda: split_frames(counts, frames))


# --- a live dispatcher under fire ---------------------------------------------------------------------


class Flood:
    """Raw DEALER peers throwing messages at a dispatcher; each peer is replaced after a few messages so
    that quarantine (which would drop everything from a peer unread) does not blunt the fuzzing."""

    def __init__(self, address: str, per_peer: int = 40, peers: int = 16):
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.address = address
        self.per_peer = per_peer
        self.peers: list[list[Any]] = [[self._peer(), 0] for _ in range(peers)]
        self.sent = 0
        self.replies = 0
        self.opened = peers

    def _peer(self) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 10_000)  # a replaced peer's queued messages are still delivered
        sock.setsockopt(zmq.SNDTIMEO, 10_000)
        sock.connect(self.address)
        return sock

    def send(self, i: int, frames: list[Any]) -> None:
        slot = self.peers[i % len(self.peers)]
        if slot[1] >= self.per_peer:
            self._drain(slot[0])
            slot[0].close()
            slot[0], slot[1] = self._peer(), 0
            self.opened += 1
        slot[0].send_multipart(frames)
        slot[1] += 1
        self.sent += 1
        if self.sent % 200 == 0:
            for s in self.peers:
                self._drain(s[0])

    def _drain(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.replies += 1

    def close(self) -> None:
        for s in self.peers:
            self._drain(s[0])
        self.ctx.destroy(linger=10_000)  # waits until every message is delivered


def _status(client: Client) -> dict[str, Any]:
    return client.status(timeout=30)


@pytest.mark.timeout(600)
def test_dispatcher_survives_fuzzing(cluster: Cluster) -> None:
    dispatcher = cluster.dispatcher
    assert dispatcher is not None
    proc = psutil.Process(dispatcher.pid)
    client = cluster.client()
    cluster.start_worker("threads", 2, None, "w1")
    cluster.wait_for_workers("w1")
    assert client.submit(tasks.add, 1, 2).result(30) == 3
    rss_before = proc.memory_info().rss

    flood = Flood(cluster.address)
    started = time.monotonic()
    try:
        for i, frames in enumerate(fuzz_messages(SEED, FUZZ_MESSAGES)):
            flood.send(i, frames)
            if i % 2000 == 1999:
                assert dispatcher.poll() is None, f"the dispatcher died after {flood.sent} messages:\n{cluster.logs()}"
    finally:
        flood.close()
    elapsed = time.monotonic() - started

    def settled() -> dict[str, Any] | None:  # the dispatcher has read everything that was sent
        first = _status(client)["totals"]["malformed"]
        time.sleep(0.5)
        status = _status(client)
        return status if status["totals"]["malformed"] == first else None

    status = wait_until(settled, 60, interval=0.1, what="the dispatcher to settle")
    assert dispatcher.poll() is None, cluster.logs()
    rss_after = proc.memory_info().rss
    security = status["security"]
    counts = {
        "sent": flood.sent, "peers": flood.opened, "replies": flood.replies, "seconds": round(elapsed, 2),
        "malformed": status["totals"]["malformed"], "submitted": status["totals"]["submitted"],
        "quarantined": security["quarantined"], "dropped_unread": security["dropped"],
        "rss_before_mib": rss_before >> 20, "rss_after_mib": rss_after >> 20,
    }
    print(f"\nfuzz: {counts}")
    (cluster.tmp / "fuzz-counts.txt").write_text(repr(counts))
    assert flood.sent >= 10_000
    assert status["totals"]["malformed"] >= flood.sent // 4, counts  # most mutations are malformed, and counted
    assert rss_after - rss_before < RSS_GROWTH_LIMIT, counts
    # the warning about malformed messages is rate-limited (one per 5 s at most)
    warnings = (cluster.tmp / "dispatcher.log").read_text().count("dropped malformed message")
    assert warnings <= elapsed / 5 + 3, warnings

    # normal work still runs, on the same dispatcher and worker
    assert [w["name"] for w in status["workers"] if w["name"] == "w1"] == ["w1"]
    assert list(client.map(tasks.add, range(50), range(50), timeout=60)) == [2 * i for i in range(50)]
    with Client(cluster.address) as fresh:
        assert fresh.submit(tasks.add, 20, 22).result(30) == 42


def _container_bomb(mib: int) -> bytes:
    """A msgpack body of `mib` arrays of 1 Mi empty arrays: one byte each on the wire, a list in memory."""
    inner = b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x90" * (1 << 20)
    return b"\xdc" + mib.to_bytes(2, "big") + inner * mib


def test_a_body_of_empty_arrays_is_refused_before_it_fills_memory() -> None:
    with pytest.raises(ProtocolError, match="too many arrays and maps"):
        decode([SIGNATURE, bytes((Cmd.SUBMIT,)), _container_bomb(2)])
    # the densest real body: a SUBMIT batch from the client, with its shortest ids and no options
    entries = [[f"0123456789-{i:x}", {}, 1] for i in range(200_000)]
    assert decode([SIGNATURE, bytes((Cmd.SUBMIT,)), msgpack.packb(entries)]).body == entries


def _peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_dispatcher_stays_small_and_awake_under_a_container_bomb(cluster: Cluster) -> None:
    dispatcher = cluster.dispatcher
    assert dispatcher is not None
    client = cluster.client()
    cluster.wait_for_workers(cluster.start_worker("threads", 1, None, "w1"))
    assert client.submit(tasks.add, 1, 2).result(30) == 3
    peak_before = _peak_rss(dispatcher.pid)
    malformed = _status(client)["totals"]["malformed"]
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        bomber = ctx.socket(zmq.DEALER)
        bomber.connect(cluster.address)
        bomber.send_multipart([SIGNATURE, bytes((Cmd.SUBMIT,)), _container_bomb(16)])  # 16 MiB: once 1.1 GiB
        wait_until(lambda: _status(client)["totals"]["malformed"] > malformed, 30, what="the bomb to be refused")
    finally:
        ctx.destroy(linger=0)
    growth = _peak_rss(dispatcher.pid) - peak_before
    assert dispatcher.poll() is None, cluster.logs()
    assert growth < 400 << 20, f"the dispatcher's peak RSS grew by {growth >> 20} MiB"
    assert client.submit(tasks.add, 2, 3).result(30) == 5
    assert [w["name"] for w in _status(client)["workers"]] == ["w1"]  # not declared lost meanwhile


def test_garbage_sender_is_quarantined(cluster: Cluster) -> None:
    client = cluster.client()
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        bad = ctx.socket(zmq.DEALER)
        bad.setsockopt(zmq.LINGER, 0)
        bad.connect(cluster.address)
        bad.send_multipart(encode(Cmd.HELLO, {"req": 0}))
        assert bad.poll(5000), "the peer is heard before it misbehaves"
        bad.recv_multipart()
        for i in range(60):
            bad.send_multipart([b"garbage", bytes([i])])
        wait_until(lambda: _status(client)["security"]["quarantined"] >= 1, 10)
        bad.send_multipart(encode(Cmd.HELLO, {"req": 1}))  # dropped unread: no WELCOME
        assert not bad.poll(1000)
        status = _status(client)
        assert status["totals"]["malformed"] >= 50 and status["security"]["dropped"] >= 1
        # everyone else is served as before
        other = ctx.socket(zmq.DEALER)
        other.setsockopt(zmq.LINGER, 0)
        other.connect(cluster.address)
        other.send_multipart(encode(Cmd.HELLO, {"req": 2}))
        assert other.poll(5000)
        assert decode(other.recv_multipart()).cmd == Cmd.WELCOME
    finally:
        ctx.destroy(linger=0)
    assert "too many malformed messages" in (cluster.tmp / "dispatcher.log").read_text()


def test_fuzz_corpus_is_reproducible() -> None:
    a = [b"".join(bytes(f) for f in m) for m in fuzz_messages(SEED, 300)]
    b = [b"".join(bytes(f) for f in m) for m in fuzz_messages(SEED, 300)]
    assert a == b
