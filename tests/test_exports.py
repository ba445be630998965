"""The public surface: what `import conveyor` exports, what it loads, and the error tree."""

from __future__ import annotations

import subprocess
import sys

import conveyor
from conveyor import errors

PUBLIC = {
    "AccessDenied", "AsyncClient", "Client", "ConveyorError", "DispatcherUnavailable", "Executor",
    "FunctionNotFound", "JobCancelled", "JobError", "JobFuture", "JournalFull", "LocalCluster", "ProtocolError",
    "ProtocolVersionError", "RemoteError", "TaskTimeout", "VersionMismatch", "WorkerCrashed", "WorkerLost",
    "__version__", "current_job", "progress",
    "DependencyCancelled", "DependencyFailed", "Failed", "UnknownDependency", "current_client", "ref",
}


def test_all_is_the_public_surface() -> None:
    assert set(conveyor.__all__) == PUBLIC
    for name in conveyor.__all__:
        assert hasattr(conveyor, name), name


def test_import_conveyor_loads_neither_the_worker_nor_the_dispatcher() -> None:
    code = (
        "import sys, conveyor; conveyor.Client; "
        "parts = lambda m: m.split('.'); "
        "bad = sorted(m for m in sys.modules if parts(m)[:2] in (['conveyor', 'worker'], ['conveyor', 'dispatcher'], "
        "['conveyor', 'cli'], ['conveyor', 'demo']) or parts(m)[0] in ('sqlite3', 'rich', 'matplotlib', "
        "'prometheus_client', 'psutil')); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_scheduler_loads_no_sockets_and_no_sqlite() -> None:
    code = (
        "import sys; from conveyor.dispatcher.scheduler import Scheduler; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('zmq', 'sqlite3')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _public_exceptions() -> list[type[BaseException]]:
    return [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, BaseException)]


def test_every_public_exception_is_a_conveyor_error_defined_in_errors() -> None:
    classes = _public_exceptions()
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, errors.ConveyorError), cls
        assert cls.__module__ == "conveyor.errors", cls
    for name in conveyor.__all__:
        value = getattr(conveyor, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert value.__module__ == "conveyor.errors", name


def test_the_tree_in_the_docstring_matches_the_classes() -> None:
    doc = errors.__doc__ or ""
    for cls in _public_exceptions():
        if cls is errors.ConveyorError:
            continue
        assert f"── {cls.__name__} " in doc or cls.__name__ == "ProtocolVersionError", cls.__name__
    job_errors = ("RemoteError", "TaskTimeout", "WorkerCrashed", "WorkerLost", "JobCancelled", "FunctionNotFound",
                  "JournalFull")
    for name in job_errors:
        assert issubclass(getattr(errors, name), errors.JobError), name
    assert issubclass(errors.VersionMismatch, errors.ProtocolError)
    assert errors.ProtocolVersionError is errors.VersionMismatch  # one class, two names
    assert issubclass(errors.TaskTimeout, TimeoutError) and issubclass(errors.FunctionNotFound, LookupError)
    assert issubclass(errors.DispatcherUnavailable, ConnectionError)
    assert issubclass(errors.AccessDenied, PermissionError)


def test_no_second_module_named_errors() -> None:
    import pathlib

    root = pathlib.Path(conveyor.__file__).parent
    assert [p.relative_to(root).as_posix() for p in root.rglob("errors.py")] == ["errors.py"]
