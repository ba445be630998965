"""The floor under Conveyor's round trip: a bare pyzmq client -> broker -> worker pipeline.

No bookkeeping, no journal, no serialization beyond the bytes themselves: the broker is a ROUTER
that forwards each request to the one worker and each reply back, the worker answers at once. The
sequential round trip it measures on this machine is what issue 6's latency target compares to.

    python -m benchmarks.bare [--samples 2000]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import zmq


def _broker(front: str, back: str) -> None:
    ctx = zmq.Context()
    clients, workers = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    clients.bind(front)
    workers.bind(back)
    worker_id = workers.recv_multipart()[0]  # the worker says hello first
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(workers, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is clients:
                client, *body = clients.recv_multipart()
                if body == [b"stop"]:
                    workers.send_multipart([worker_id, b"stop"])
                    return
                workers.send_multipart([worker_id, client, *body])
            else:
                _, client, *body = workers.recv_multipart()
                clients.send_multipart([client, *body])


def _worker(back: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(back)
    sock.send(b"hello")
    while True:
        parts = sock.recv_multipart()
        if parts == [b"stop"]:
            return
        sock.send_multipart(parts)  # [client, body]: the answer goes back as it came


@contextmanager
def pipeline() -> Iterator[tuple[Callable[[], None], list[int]]]:
    """The broker and the worker running: (one round trip, their pids)."""
    ctx = zmq.Context()
    probe = ctx.socket(zmq.ROUTER)
    front_port = probe.bind_to_random_port("tcp://127.0.0.1")
    back_port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close()
    front, back = f"tcp://127.0.0.1:{front_port}", f"tcp://127.0.0.1:{back_port}"
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_broker, args=(front, back)), spawn.Process(target=_worker, args=(back,))]
    for p in procs:
        p.start()
    client = ctx.socket(zmq.DEALER)
    client.connect(front)
    counter = itertools.count()

    def round_trip() -> None:
        i = next(counter)
        client.send(i.to_bytes(8, "little"))
        if client.poll(10_000) == 0:
            raise TimeoutError("the bare pipeline did not answer within 10 s")
        assert int.from_bytes(client.recv(), "little") == i

    try:
        yield round_trip, [p.pid for p in procs if p.pid is not None]
        client.send(b"stop")
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        client.close(linger=0)
        ctx.term()


def measure(samples: int, warmup: int = 200) -> dict[str, Any]:
    with pipeline() as (round_trip, _):
        for _ in range(warmup):
            round_trip()
        ns: list[int] = []
        for _ in range(samples):
            started = time.perf_counter_ns()
            round_trip()
            ns.append(time.perf_counter_ns() - started)
    us = [x / 1000 for x in ns]
    cuts = statistics.quantiles(us, n=100, method="inclusive")
    return {"samples": samples, "p50_us": cuts[49], "p99_us": cuts[98], "mean_us": statistics.fmean(us)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    r = measure(args.samples)
    print(f"bare pyzmq pipeline, sequential round trip: p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs "
          f"(mean {r['mean_us']:.0f} µs, {r['samples']} samples)")


if __name__ == "__main__":
    main()
