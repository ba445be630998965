"""What CurveZMQ costs: the same workloads on a local cluster without keys and with keys.

    python -m benchmarks.curve                 # defaults: a few seconds per measurement
    python -m benchmarks.curve --tasks 20000 --repeats 5 --json

Each run starts a dispatcher and workers (threads mode) as real processes on 127.0.0.1, once plain
and once with keys from `conveyor keys init` (CURVE encrypts every frame: call, arguments, results),
and measures:

- no-op tasks/s, one task per message (per-message overhead: handshake is once, encryption per frame);
- no-op tasks/s with map(chunksize=256) (the per-message cost amortised);
- MiB/s of 1 MiB arguments sent and echoed back (per-byte cost of the encryption);
- the round-trip latency of one task at a time (median and p99);
- for reference, raw ZeroMQ throughput of one DEALER -> ROUTER hop on loopback (no Conveyor at all):
  100-byte messages per second and MiB/s of 1 MiB messages, NULL vs CURVE (`raw_*`).

The medians of `--repeats` runs are printed side by side with the ratio curve/plain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _measure(client: Any, tasks: int, payload_tasks: int, latency_tasks: int) -> dict[str, float]:
    out: dict[str, float] = {}
    t = time.perf_counter()
    assert sum(1 for _ in client.map("benchmarks.tasks:noop", range(tasks), chunksize=1)) == tasks
    out["noop_tasks_per_s"] = tasks / (time.perf_counter() - t)

    n = tasks * 10
    t = time.perf_counter()
    assert sum(1 for _ in client.map("benchmarks.tasks:noop", range(n), chunksize=256)) == n
    out["chunked_tasks_per_s"] = n / (time.perf_counter() - t)

    blob = os.urandom(1 << 20)
    t = time.perf_counter()
    futures = [client.submit("benchmarks.tasks:noop", blob) for _ in range(payload_tasks)]
    for f in futures:
        assert len(f.result(120)) == len(blob)
    out["payload_mib_per_s"] = 2 * payload_tasks / (time.perf_counter() - t)  # 1 MiB there and back

    samples = []
    for i in range(latency_tasks):
        t = time.perf_counter()
        client.submit("benchmarks.tasks:noop", i).result(30)
        samples.append(time.perf_counter() - t)
    samples.sort()
    out["latency_p50_ms"] = 1000 * statistics.median(samples)
    out["latency_p99_ms"] = 1000 * samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return out


def raw_zmq(curve: bool, size: int, count: int) -> float:
    """Messages per second through one DEALER -> ROUTER connection (two contexts: two I/O threads)."""
    import threading

    import zmq

    server_ctx: zmq.Context[Any] = zmq.Context()
    client_ctx: zmq.Context[Any] = zmq.Context()
    router = server_ctx.socket(zmq.ROUTER)
    dealer = client_ctx.socket(zmq.DEALER)
    try:
        if curve:
            server_public, server_secret = zmq.curve_keypair()
            client_public, client_secret = zmq.curve_keypair()
            router.curve_server = True
            router.curve_secretkey, router.curve_publickey = server_secret, server_public
            dealer.curve_secretkey, dealer.curve_publickey = client_secret, client_public
            dealer.curve_serverkey = server_public
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"warm-up")
        router.recv_multipart()
        assert router.getsockopt(zmq.MECHANISM) == (zmq.CURVE if curve else zmq.NULL)
        payload = os.urandom(size)

        def send() -> None:
            for _ in range(count):
                dealer.send(payload, copy=size < 65536)

        started = time.perf_counter()
        sender = threading.Thread(target=send)
        sender.start()
        for _ in range(count):
            router.recv_multipart(copy=False)
        elapsed = time.perf_counter() - started
        sender.join()
        return count / elapsed
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        server_ctx.term()
        client_ctx.term()


def run(keys: str | None, args: argparse.Namespace) -> dict[str, float]:
    from conveyor import Client, LocalCluster

    with LocalCluster(workers=args.workers, mode="threads", concurrency=args.concurrency, keys=keys) as cluster:
        assert cluster.address is not None
        with Client(cluster.address, keys=keys, connect_timeout=30) as client:
            client.wait_for_workers(args.workers)
            client.submit("benchmarks.tasks:noop", 0).result(30)  # warm: imports, connections
            mechanism = client.status()["security"]["mechanism"]
            assert mechanism == ("CURVE" if keys else "NULL"), mechanism
            out = _measure(client, args.tasks, args.payload_tasks, args.latency_tasks)
    out["raw_small_msgs_per_s"] = raw_zmq(keys is not None, 100, args.tasks * 20)
    out["raw_1mib_mib_per_s"] = raw_zmq(keys is not None, 1 << 20, args.payload_tasks * 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.curve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="no-op tasks per run (x10 for the chunked map)")
    parser.add_argument("--payload-tasks", type=int, default=200, help="1 MiB echo tasks per run")
    parser.add_argument("--latency-tasks", type=int, default=300, help="sequential round trips per run")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)  # workers import benchmarks.tasks from their working directory
    sys.path.insert(0, REPO_ROOT)

    from conveyor.security.keys import init_directory

    results: dict[str, list[dict[str, float]]] = {"plain": [], "curve": []}
    with tempfile.TemporaryDirectory(prefix="conveyor-curve-bench-") as tmp:
        keys = os.path.join(tmp, "keys")
        init_directory(keys)
        for i in range(args.repeats):  # interleaved, so a drift of the machine hits both alike
            for name, key_dir in (("plain", None), ("curve", keys)):
                results[name].append(run(key_dir, args))
                if not args.json:
                    print(f"run {i + 1}/{args.repeats} {name}: {_fmt(results[name][-1])}", file=sys.stderr)

    def median(name: str, metric: str) -> float:
        return statistics.median(r[metric] for r in results[name])

    metrics = list(results["plain"][0])
    summary = {
        m: {"plain": median("plain", m), "curve": median("curve", m), "ratio": median("curve", m) / median("plain", m)}
        for m in metrics
    }
    doc = {"args": vars(args), "cpus": os.cpu_count(), "median": summary, "runs": results}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{'metric':24} {'plain':>12} {'curve':>12} {'curve/plain':>12}")
    for m, row in summary.items():
        print(f"{m:24} {row['plain']:12.1f} {row['curve']:12.1f} {row['ratio']:12.2f}")
    return 0


def _fmt(r: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.1f}" for k, v in r.items())


if __name__ == "__main__":
    raise SystemExit(main())
