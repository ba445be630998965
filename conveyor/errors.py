"""Exceptions a Conveyor user can catch."""

from __future__ import annotations


class ConveyorError(Exception):
    """Base class of Conveyor's own errors."""


class DispatcherUnavailable(ConveyorError, ConnectionError):
    """No dispatcher answered at the address within the connect timeout."""


class ProtocolVersionError(ConveyorError):
    """The dispatcher speaks another protocol version."""


class RemoteError(ConveyorError):
    """A task raised an exception whose type cannot be rebuilt in the client.

    `type_name` is the remote exception's qualified type name and `remote_traceback` its traceback text.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback


class TaskTimeout(ConveyorError, TimeoutError):
    """The task ran longer than its `timeout`."""


class WorkerCrashed(ConveyorError):
    """The process running the task died (a crash, a signal, os._exit) before it returned."""


class WorkerLost(ConveyorError):
    """The worker holding the task stopped answering heartbeats, more times than the retry limit allows."""


class JobCancelled(ConveyorError):
    """The job was cancelled."""


class FunctionNotFound(ConveyorError, LookupError):
    """The worker could not import the function the task names."""


class RemoteTraceback(Exception):
    """Carries the worker's traceback text as the `__cause__` of a re-raised task exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class AccessDenied(ConveyorError, PermissionError):
    """The dispatcher refused this peer: an unknown or revoked key, a key of the other role (a client key
    used by a worker or the reverse), or keys that do not match the dispatcher's (see docs/security.md)."""


class KeysError(ConveyorError):
    """A key directory or key file is missing, malformed or cannot be written."""


class InsecureBindError(ConveyorError):
    """Refused to listen on a non-loopback address without keys (pass keys, or insecure=True)."""
