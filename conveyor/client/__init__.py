"""The client side: the Python API (Client, AsyncClient, Executor), its connection to the dispatcher and a
local cluster.

    sync.py        Client: submit, map, results by id, status
    aio.py         AsyncClient: the same methods as awaitables
    executor.py    Executor: a concurrent.futures.Executor
    base.py        what both clients share: options, encoding, the connection's lifecycle (ClientState)
    mapping.py     map's jobs in flight and its automatic chunk sizes
    future.py      JobFuture, the future of one job
    deps.py        futures as arguments (parents), after, allow_failure, batches; ref(job_id)
    connection.py  the DEALER socket and its I/O thread
    local.py       LocalCluster: a dispatcher and workers as child processes
    progress.py    progress bars on the terminal
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.client.aio import AsyncClient, AsyncJobFuture
    from conveyor.client.base import ClientState
    from conveyor.client.deps import JobRef, current_client, ref
    from conveyor.client.executor import Executor
    from conveyor.client.future import JobFuture
    from conveyor.client.local import LocalCluster
    from conveyor.client.sync import Client

# Loaded on first use: `conveyor up` imports local.py alone to start its processes, then the rest.
_WHERE = {
    "AsyncClient": "aio", "AsyncJobFuture": "aio", "ClientState": "base", "Executor": "executor",
    "JobFuture": "future", "LocalCluster": "local", "Client": "sync", "JobRef": "deps",
    "current_client": "deps", "ref": "deps",
}


def __getattr__(name: str) -> Any:
    if name == "current_client":
        from conveyor import task

        if task.no_client is not None:  # (a subinterpreter, which cannot even import a client)
            return _no_client
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _no_client() -> Any:
    """conveyor.current_client() where no client can exist (interpreters mode): a clear error."""
    from conveyor import task

    raise RuntimeError(task.no_client)


__all__ = [
    "AsyncClient", "AsyncJobFuture", "Client", "ClientState", "Executor", "JobFuture", "JobRef", "LocalCluster",
    "current_client", "ref",
]
