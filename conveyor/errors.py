"""Every exception Conveyor raises on purpose, in one tree. Catch `ConveyorError` for all of them.

    ConveyorError
    ├── DispatcherUnavailable      no dispatcher answered in time, or it was lost (also ConnectionError)
    ├── AccessDenied               the dispatcher refused this peer's key or role (also PermissionError)
    ├── DispatcherRefused          the dispatcher ended a worker's session (ERROR)
    ├── ProtocolError              a message that does not follow docs/protocol.md
    │   └── VersionMismatch        the peer speaks another protocol version
    ├── JobError                   how a job ended, raised by its future's result()
    │   ├── RemoteError            the task raised an exception whose type cannot be rebuilt here
    │   │   └── JobRejected        the dispatcher refused the submission: a bad option, an unknown limit
    │   │       │                  key (also ValueError)
    │   │       └── UnknownDependency  a job it depends on is unknown (never submitted, or forgotten)
    │   ├── TaskTimeout            it ran longer than its timeout (also TimeoutError)
    │   ├── WorkerCrashed          the process running it died
    │   ├── WorkerLost             its worker stopped answering, more often than retries allow
    │   ├── JobCancelled           it was cancelled
    │   ├── FunctionNotFound       the worker could not import its function (also LookupError)
    │   ├── JobExpired             it had not started by its expiry time
    │   ├── DependencyFailed       a job it depends on failed for good (its `root` says which)
    │   ├── DependencyCancelled    a job it depends on was cancelled (or expired)
    │   └── JournalFull            the dispatcher could not make it durable: its journal's disk is full
    ├── RemoteTraceback            the worker's traceback, as the __cause__ of a re-raised task error
    └── configuration errors (also ValueError or RuntimeError where that is what they are):
        ├── KeysError              a key directory or key file is missing, malformed or unwritable
        ├── InsecureBindError      a non-loopback address without keys (pass keys, or insecure=True)
        ├── InventoryError         a `conveyor cluster` inventory file that cannot be used
        └── JournalInUse           another dispatcher holds the journal
"""

from __future__ import annotations


class ConveyorError(Exception):
    """Base class of Conveyor's own errors."""


class DispatcherUnavailable(ConveyorError, ConnectionError):
    """No dispatcher answered at the address within the connect timeout, or it stopped answering."""


class AccessDenied(ConveyorError, PermissionError):
    """The dispatcher refused this peer: an unknown or revoked key, a key of the other role (a client key
    used by a worker or the reverse), or keys that do not match the dispatcher's (see docs/security.md)."""


class DispatcherRefused(ConveyorError):
    """The dispatcher ended this worker's session with an ERROR message (a key not allowed, a version)."""


class ProtocolError(ConveyorError):
    """A message that does not follow docs/protocol.md."""


class VersionMismatch(ProtocolError):
    """A peer speaks another Conveyor protocol version."""


ProtocolVersionError = VersionMismatch  # its name before 0.2; the same class


# --- how a job ended ---------------------------------------------------------------------------------


class JobError(ConveyorError):
    """A job did not succeed for a reason of Conveyor's own (a task's own exception is re-raised as itself)."""


class RemoteError(JobError):
    """A task raised an exception whose type cannot be rebuilt in the client.

    `type_name` is the remote exception's qualified type name and `remote_traceback` its traceback text.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback


class JobRejected(RemoteError, ValueError):
    """The dispatcher refused the submission itself: an option it cannot accept, or a limit key it does not
    know. The message says which."""


class UnknownDependency(JobRejected):
    """A job named as a parent is unknown to the dispatcher (never submitted, or already forgotten): the
    submission is refused at once rather than left waiting forever."""


class TaskTimeout(JobError, TimeoutError):
    """The task ran longer than its `timeout`."""


class WorkerCrashed(JobError):
    """The process running the task died (a crash, a signal, os._exit) before it returned."""


class WorkerLost(JobError):
    """The worker holding the task stopped answering heartbeats, more times than the retry limit allows."""


class JobCancelled(JobError):
    """The job was cancelled."""


class FunctionNotFound(JobError, LookupError):
    """The worker could not import the function the task names."""


class JobExpired(JobError):
    """The job had not started by its expiry time (`options(expires=...)`); it never ran."""


class DependencyFailed(JobError):
    """A job this one depends on failed for good, so this one never ran.

    `root` is the id of the job whose failure started it, `root_fn` its function, and the root's own
    error is this exception's `__cause__` (rebuilt as in its own future)."""

    def __init__(self, message: str, root: str = "", root_fn: str = ""):
        super().__init__(message)
        self.root = root
        self.root_fn = root_fn


class DependencyCancelled(JobError):
    """A job this one depends on was cancelled or expired, so this one never ran (`root` says which)."""

    def __init__(self, message: str, root: str = ""):
        super().__init__(message)
        self.root = root


class JournalFull(JobError):
    """The dispatcher refused the job because its journal's disk is full: nothing was accepted, so nothing
    is lost; submit again once there is room (the dispatcher accepts work again on its own)."""


class RemoteTraceback(ConveyorError):
    """Carries the worker's traceback text as the `__cause__` of a re-raised task exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


# --- configuration -----------------------------------------------------------------------------------


class KeysError(ConveyorError):
    """A key directory or key file is missing, malformed or cannot be written."""


class InsecureBindError(ConveyorError):
    """Refused to listen on a non-loopback address without keys (pass keys, or insecure=True)."""


class InventoryError(ConveyorError, ValueError):
    """A `conveyor cluster` inventory file that cannot be read or used; the message says where and why."""


class JournalInUse(ConveyorError, RuntimeError):
    """Another dispatcher holds this journal (one dispatcher per journal)."""
