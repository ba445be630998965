"""Conveyor: a distributed task runner for Python built on ZeroMQ."""

from conveyor.client import AsyncClient, Client, Executor
from conveyor.connection import JobFuture
from conveyor.errors import (
    ConveyorError,
    DispatcherUnavailable,
    FunctionNotFound,
    JobCancelled,
    ProtocolVersionError,
    RemoteError,
    TaskTimeout,
    WorkerCrashed,
    WorkerLost,
)
from conveyor.local import LocalCluster

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ConveyorError",
    "DispatcherUnavailable",
    "Executor",
    "FunctionNotFound",
    "JobCancelled",
    "JobFuture",
    "LocalCluster",
    "ProtocolVersionError",
    "RemoteError",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerLost",
    "__version__",
]
