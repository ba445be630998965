"""A client in its own process (tests/test_workflows.py): a 100 MB parent feeds a dependant; prints
how much this process's peak memory grew meanwhile, then fetches the parent's result itself."""

from __future__ import annotations

import json
import resource
import sys

import psutil

from conveyor import Client
from tests import graph_tasks as g

MB = 1 << 20


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def main(address: str) -> None:
    with Client(address) as client:
        before = peak_kib()
        big = client.submit(g.blob, 100 * MB)
        used = client.submit(g.length, big)
        n = used.result(timeout=120)
        during = peak_kib() - before
        out = {"length": n, "peak_growth_kib": during, "withheld": big.withheld}
        data = big.result(timeout=60)  # asked for now: it stayed in the dispatcher
        out["fetched"] = len(data)
        # The control (the measure can see 100 MB arrive): this process's resident memory now, held.
        out["peak_growth_after_fetch_kib"] = max(peak_kib(), psutil.Process().memory_info().rss >> 10) - before
        del data
        print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
