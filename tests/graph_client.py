"""A client in its own process (tests/test_workflows.py): a 100 MB parent feeds a dependant; prints
how much this process's peak memory grew meanwhile, then fetches the parent's result itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conveyor import Client
from tests import graph_tasks as g

MB = 1 << 20


def peak_kib() -> int:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: that survives exec, so a
    child of a large pytest process starts with the parent's peak and never shows growth."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


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
        # The control (the measure can see 100 MB arrive): the peak with the fetched result held.
        out["peak_growth_after_fetch_kib"] = peak_kib() - before
        del data
        print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
