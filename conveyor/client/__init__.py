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

from conveyor.client.aio import AsyncClient, AsyncJobFuture
from conveyor.client.base import ClientState
from conveyor.client.deps import JobRef, current_client, ref
from conveyor.client.executor import Executor
from conveyor.client.future import JobFuture
from conveyor.client.local import LocalCluster
from conveyor.client.sync import Client

__all__ = [
    "AsyncClient", "AsyncJobFuture", "Client", "ClientState", "Executor", "JobFuture", "JobRef", "LocalCluster",
    "current_client", "ref",
]
