"""Conveyor: a distributed task runner for Python built on ZeroMQ.

The public surface is what this module exports (tests/test_exports.py keeps it so). The client
classes load on first use: a worker or a task that imports `conveyor` (for `progress`) loads no
sockets, and nothing here ever loads the dispatcher or the worker.
"""

from typing import TYPE_CHECKING, Any

from conveyor.errors import (
    AccessDenied,
    ConveyorError,
    DependencyCancelled,
    DependencyFailed,
    DispatcherUnavailable,
    FunctionNotFound,
    JobCancelled,
    JobError,
    JournalFull,
    ProtocolError,
    ProtocolVersionError,
    RemoteError,
    TaskTimeout,
    UnknownDependency,
    VersionMismatch,
    WorkerCrashed,
    WorkerLost,
)
from conveyor.task import Failed, current_job, progress  # inside a task: progress(...), current_job(); Failed

if TYPE_CHECKING:
    from conveyor.client import AsyncClient, Client, Executor, JobFuture, LocalCluster, current_client, ref

_CLIENT_NAMES = frozenset({"AsyncClient", "Client", "Executor", "JobFuture", "LocalCluster", "current_client", "ref"})


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        import conveyor.client

        return getattr(conveyor.client, name)
    raise AttributeError(f"module 'conveyor' has no attribute {name!r}")

__version__ = "0.2.0"

__all__ = [
    "AccessDenied",
    "AsyncClient",
    "Client",
    "ConveyorError",
    "DependencyCancelled",
    "DependencyFailed",
    "DispatcherUnavailable",
    "Executor",
    "Failed",
    "FunctionNotFound",
    "JobCancelled",
    "JobError",
    "JobFuture",
    "JournalFull",
    "LocalCluster",
    "ProtocolError",
    "ProtocolVersionError",
    "RemoteError",
    "TaskTimeout",
    "UnknownDependency",
    "VersionMismatch",
    "WorkerCrashed",
    "WorkerLost",
    "__version__",
    "current_client",
    "current_job",
    "progress",
    "ref",
]
