"""A client program the multi-host tests run inside a namespace host, and the task it submits.

    python -m tests.multihost_client ADDRESS COUNT SECONDS

submits COUNT calls of `slow_square(i, SECONDS)` and prints, as each finishes, one JSON line
{"i", "value", "worker", "attempts"}; then {"done": COUNT}. Exits 1 on the first failed task.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import as_completed


def slow_square(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * x


def main(argv: list[str]) -> int:
    from conveyor import Client

    address, count, seconds = argv[0], int(argv[1]), float(argv[2])
    with Client(address, connect_timeout=20, reconnect_timeout=60) as client:
        futures = {client.submit("tests.multihost_client:slow_square", i, seconds): i for i in range(count)}
        for fut in as_completed(futures, timeout=120):
            i = futures[fut]
            try:
                value = fut.result()
            except Exception as exc:
                print(json.dumps({"i": i, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
                return 1
            info = fut.info
            print(json.dumps({"i": i, "value": value, "worker": info.get("worker"),
                              "attempts": info.get("attempts")}), flush=True)
    print(json.dumps({"done": count}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
