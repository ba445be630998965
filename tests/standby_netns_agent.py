"""Programs tests/test_standby_netns.py and test_standby_chaos.py run inside namespace hosts (the tests' own
namespace reaches none).

    python -m tests.standby_netns_agent sample A B        # probe both every 50 ms: one JSON line a sample
    python -m tests.standby_netns_agent load A,B COUNT GAP_S TASK_S OFFSET   # a connected client under load
    python -m tests.standby_netns_agent detach A,B COUNT TASK_S OFFSET       # submit, print ids, exit
    python -m tests.standby_netns_agent fetch A,B ID...    # one JSON line {"id", "value"} a job
    python -m tests.standby_netns_agent submit-to ADDRESS SECONDS  # one SUBMIT to that dispatcher alone
    python -m tests.standby_netns_agent pair-status ADDRESS  # the pair's part of that dispatcher's STATUS

`sample` asks both dispatchers at once (one STATUS each on fresh raw sockets, as tests/test_standby_pair.py's
`probe` does; a REDIRECT means passive, i.e. not serving) and prints {"t": monotonic, "a": [state, epoch] or
null, "b": ..., "sync": whether the active one reports its replication in sync} until stdin closes.
`load` submits COUNT `sleep_for` jobs GAP_S apart, prints
{"accepted": n} once all are acknowledged, then {"i", "value"} as each finishes and finally {"done",
"duplicates"}.
"""

from __future__ import annotations

import json
import select
import sys
import time
from concurrent.futures import as_completed
from typing import Any

import zmq

from conveyor.protocol import Cmd, encode
from conveyor.protocol import commands as c
from conveyor.protocol.frames import frame_epoch, split

SAMPLE_EVERY_S = 0.05
PROBE_TIMEOUT_S = 0.25


def _emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def _answer(parts: list[bytes]) -> tuple[list[Any], str]:
    """[state, epoch] of one dispatcher, and its replication ("in-sync", "degraded"; "" if passive)."""
    cmd, raw, _ = split(parts)
    body = c.decode_body(cmd, raw)
    if cmd == Cmd.REDIRECT:
        return ["passive", body.epoch], ""
    pair = body.dispatcher.get("pair", {})
    return [pair.get("state", "?"), frame_epoch(parts[1])], str(pair.get("replication", ""))


def probe_both(ctx: zmq.Context[Any], addresses: list[str]) -> dict[str, Any]:
    """One STATUS to each address at the same instant; their answers (None: none within the timeout)."""
    t = time.monotonic()
    socks = []
    for address in addresses:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        sock.send_multipart(encode(Cmd.STATUS, {"req": 1}))
        socks.append(sock)
    answers: list[list[Any] | None] = [None] * len(socks)
    replication = [""] * len(socks)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    deadline = t + PROBE_TIMEOUT_S
    try:
        while any(a is None for a in answers) and time.monotonic() < deadline:
            ready = dict(poller.poll(max(1, int((deadline - time.monotonic()) * 1000))))
            for i, sock in enumerate(socks):
                if sock in ready and answers[i] is None:
                    answers[i], replication[i] = _answer(sock.recv_multipart())
                    poller.unregister(sock)
    finally:
        for sock in socks:
            sock.close()
    return {"t": t, "a": answers[0], "b": answers[1], "sync": "in-sync" in replication}


def sample(a: str, b: str) -> int:
    ctx: zmq.Context[Any] = zmq.Context()
    while True:
        started = time.monotonic()
        _emit(probe_both(ctx, [a, b]))
        pause = max(0.0, SAMPLE_EVERY_S - (time.monotonic() - started))
        if select.select([sys.stdin], [], [], pause)[0] and not sys.stdin.readline():
            return 0  # stdin closed: the test is done sampling


def load(addresses: str, count: int, gap_s: float, task_s: float, offset: int) -> int:
    from conveyor import Client

    with Client(addresses.split(","), connect_timeout=20, reconnect_timeout=60) as client:
        futures: dict[Any, int] = {}
        for i in range(offset, offset + count):
            futures[client.options(keep=True).submit("tests.tasks:sleep_for", task_s, i)] = i
            time.sleep(gap_s)  # the load's pace, not a wait for anything
        client._conn.wait_accepted(list(futures), 30)  # type: ignore[union-attr]
        _emit({"accepted": sum(1 for f in futures if f._accepted or f.done())})  # done: its result came first
        for fut in as_completed(futures, timeout=120):
            _emit({"i": futures[fut], "value": fut.result()})
        _emit({"done": count, "duplicates": client.duplicate_results})
    return 0


def detach(addresses: str, count: int, task_s: float, offset: int) -> int:
    from conveyor import Client

    client = Client(addresses.split(","), connect_timeout=20)
    futures = [client.options(keep=True).submit("tests.tasks:sleep_for", task_s, offset + i) for i in range(count)]
    client._conn.wait_accepted(futures, 30)  # type: ignore[union-attr]
    if not all(f._accepted for f in futures):
        return 1
    print(" ".join(f.job_id for f in futures), flush=True)
    client.close()
    return 0


def fetch(addresses: str, ids: list[str]) -> int:
    from conveyor import Client

    with Client(addresses.split(","), connect_timeout=20, reconnect_timeout=60) as client:
        for job_id in ids:
            _emit({"id": job_id, "value": client.result(job_id, timeout=60)})
    return 0


def submit_to(address: str, seconds: float) -> int:
    """A client that knows only this dispatcher: was its one job ACCEPTED within `seconds`?"""
    from conveyor import Client

    started = time.monotonic()
    try:
        client = Client([address], connect_timeout=seconds)
        try:
            fut = client.options(keep=True).submit("tests.tasks:sleep_for", 0.0, -1)
            client._conn.wait_accepted([fut], seconds)  # type: ignore[union-attr]
            conn: Any = client._conn
            _emit({"accepted": bool(fut._accepted), "s": time.monotonic() - started,
                   "redirects": conn.failover.redirects if conn is not None else None})
        finally:
            client.close()
    except Exception as exc:  # no WELCOME from a passive dispatcher: refused, not accepted
        _emit({"accepted": False, "s": time.monotonic() - started, "error": f"{type(exc).__name__}: {exc}"})
    return 0


def pair_status(address: str) -> int:
    """The pair's part of one dispatcher's STATUS (a client that knows only it: a passive answers too)."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    sock.send_multipart(encode(Cmd.STATUS, {"req": 1}))
    if not sock.poll(5000):
        return 1
    cmd, raw, _ = split(sock.recv_multipart())
    if cmd == Cmd.REDIRECT:
        return 1
    _emit(c.decode_body(cmd, raw).dispatcher.get("pair", {}))
    sock.close()
    ctx.term()
    return 0


def main(argv: list[str]) -> int:
    mode, rest = argv[0], argv[1:]
    if mode == "sample":
        return sample(rest[0], rest[1])
    if mode == "load":
        return load(rest[0], int(rest[1]), float(rest[2]), float(rest[3]), int(rest[4]))
    if mode == "detach":
        return detach(rest[0], int(rest[1]), float(rest[2]), int(rest[3]))
    if mode == "fetch":
        return fetch(rest[0], rest[1:])
    if mode == "submit-to":
        return submit_to(rest[0], float(rest[1]))
    if mode == "pair-status":
        return pair_status(rest[0])
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
