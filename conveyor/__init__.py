"""Conveyor: a distributed task runner for Python built on ZeroMQ."""

from conveyor.client import AsyncClient, Client, Executor
from conveyor.connection import JobFuture
from conveyor.errors import (
    AccessDenied,
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
from conveyor.worker.capture import progress  # conveyor.progress(fraction, message) inside a task

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
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
    "progress",
]
