"""Fixtures for tests that need several hosts: private networks of network namespaces (tests/netns.py).

Loaded from tests/conftest.py through `pytest_plugins`. Outside CI a machine without root or iproute2
skips these tests with the reason; with CI=true a missing capability fails them instead, so CI cannot
pass by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import pytest

from tests import netns

_stale_checked = False


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(reason: str | None) -> None:
    """Skip (or, in CI, fail) the test when `reason` says a capability is missing."""
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def netns_network() -> Iterator[Callable[..., netns.Network]]:
    """Factory: `net = netns_network(["a", "b", "c"])` (or a count) builds a private network of hosts.

    Every network made is torn down when the test ends, passed, failed or interrupted: processes in its
    hosts stopped, namespaces, bridge and iptables rule removed. Leftovers of dead runs go first.
    """
    global _stale_checked
    require(netns.missing_capability())
    if not _stale_checked:
        _stale_checked = True
        netns.cleanup_stale()
    made: list[netns.Network] = []

    def make(names: Iterable[str] | int = 2, subnet: str | None = None) -> netns.Network:
        net = netns.Network(names, subnet=subnet)
        made.append(net)
        return net

    try:
        yield make
    finally:
        for net in reversed(made):
            net.close()
