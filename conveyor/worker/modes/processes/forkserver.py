"""The fork server of processes mode: a fresh interpreter that has imported child.py and forks each child.

Why not multiprocessing's `forkserver`: it always starts a resource tracker too (one more interpreter,
about 15 MiB of RSS and 0.1 s of CPU at start-up, for named semaphores Conveyor does not use), its server
outlives the pool that started it, and its children are daemonic multiprocessing processes, which may
not start processes of their own. This one is owned by its pool (`ForkServer.close` ends it), carries
only what a child needs, and forks children that are plain processes.

    worker (ProcessesMode)  --control socket: one request at a time, the child's fds passed along-->  server
    server --fork--> child: runs child_main on the passed fds; the server reaps it and writes its exit
                     code (negative: the signal that killed it) to the child's status pipe, then closes it

The worker waits on the status pipe's read end (`ChildProcess.sentinel`), as on a multiprocessing
sentinel. The server exits when the control socket closes (the worker is gone or closed it); on Linux
its children are killed when it exits (PR_SET_PDEATHSIG), so no task outlives the worker's pool.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

STATUS_BYTES = 4  # a child's exit code on its status pipe: signed, little-endian
UNKNOWN_EXIT = 255  # the status pipe closed without a code: the fork server itself died
STOP_WAIT_S = 2.0  # the server gets this long to exit once its control socket is closed, then is killed


class ChildProcess:
    """A child forked by the fork server: what the pool uses of a multiprocessing Process."""

    def __init__(self, pid: int, status_fd: int):
        self.pid = pid
        self.sentinel = status_fd  # readable once the child has exited (its code) or the server died (EOF)
        self.exitcode: int | None = None
        self.server_died = False  # its status pipe closed without a code: the fork server died, and it with it

    def _poll(self, timeout_s: float | None) -> int | None:
        if self.exitcode is None and self.sentinel >= 0:
            poller = select.poll()  # (not select.select: a worker with many children has descriptors past 1024)
            poller.register(self.sentinel, select.POLLIN)
            if poller.poll(None if timeout_s is None else timeout_s * 1000):
                data = os.read(self.sentinel, STATUS_BYTES)
                self.server_died = len(data) != STATUS_BYTES
                self.exitcode = UNKNOWN_EXIT if self.server_died else int.from_bytes(data, "little", signed=True)
        return self.exitcode

    def is_alive(self) -> bool:
        return self._poll(0) is None

    def join(self, timeout_s: float | None = None) -> None:
        self._poll(timeout_s)

    def kill(self) -> None:
        if self.is_alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Close the status pipe (once nothing watches it any more)."""
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


class ForkServer:
    """The worker's end: starts the server on first use (again if it died) and asks it for children.

    Thread-safe: the pool starts its children from threads, and requests go one at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    def _ensure_running(self) -> socket.socket:
        if self._process is not None and self._process.poll() is None and self._control is not None:
            return self._control
        self._stop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        code = (f"import sys; sys.path[:] = {sys.path!r}; "
                f"from conveyor.worker.modes.processes.forkserver import serve; serve({theirs.fileno()})")
        try:
            # The interpreter's flags (-X importtime, -O, ...) are passed on, as multiprocessing does.
            argv = [sys.executable, *subprocess._args_from_interpreter_flags(), "-c", code]  # type: ignore[attr-defined]
            self._process = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._control = ours
        return ours

    def start_child(self, fds: list[int], log_level: int, capture: bool) -> ChildProcess:
        """Fork a child running child_main on `fds` (its task pipe, then its output pipes, if any). The
        caller keeps and closes its copies of `fds`."""
        status_r, status_w = os.pipe()
        try:
            request = json.dumps({"log_level": log_level, "capture": capture}).encode()
            with self._lock:
                control = self._ensure_running()
                try:
                    socket.send_fds(control, [len(request).to_bytes(4, "little") + request], [status_w, *fds])
                    reply = _read_exactly(control, 8)
                except OSError:
                    self._stop()
                    raise
            pid = int.from_bytes(reply, "little", signed=True)
            if pid <= 0:
                raise OSError(-pid, f"the fork server could not fork a child: {os.strerror(-pid)}")
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        return ChildProcess(pid, status_r)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def close(self) -> None:
        """End the server (after the pool's children have exited: its remaining ones die with it)."""
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self._control is not None:
            self._control.close()  # EOF: the server exits
            self._control = None
        process, self._process = self._process, None
        if process is not None:
            try:
                process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("the fork server closed its control socket")
        data += chunk
    return data


# --- the server ----------------------------------------------------------------------------------------


def serve(control_fd: int) -> None:
    """Run the fork server on `control_fd` until it closes."""
    import cloudpickle  # noqa: F401 - preloaded, as child.py is: a task's function may come by value

    from conveyor.worker.modes.processes import child  # noqa: F401 - preloaded: every child starts with it

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group; the worker ends us
    control = socket.socket(fileno=control_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # (a handler, so that the wake-up fd is written)
    statuses: dict[int, int] = {}  # pid -> write end of its status pipe
    die_with_parent = _parent_death_signal(os.getpid())
    poller = select.poll()
    poller.register(control_fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(statuses)
        if control_fd not in ready:
            continue
        try:
            request, fds = _receive(control)
        except (OSError, ValueError):
            request, fds = None, []
        if request is None:
            return  # the worker closed the control socket or is gone
        status_w, child_fds = fds[0], fds[1:]
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            control.sendall((-(exc.errno or 1)).to_bytes(8, "little", signed=True))
            continue
        if pid == 0:
            control.close()
            for fd in (wake_r, wake_w, status_w, *statuses.values()):
                os.close(fd)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            die_with_parent()
            _run_child(child_fds, request)
        statuses[pid] = status_w
        for fd in child_fds:
            os.close(fd)
        control.sendall(pid.to_bytes(8, "little", signed=True))


def _receive(control: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One request: a 4-byte length, a JSON object, and the fds that came with its first bytes."""
    data, fds, _flags, _addr = socket.recv_fds(control, 4096, 16)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "little"):
        more = control.recv(4096)
        if not more:
            return None, fds
        data += more
    return json.loads(data[4:]), fds


def _run_child(fds: list[int], request: dict[str, Any]) -> None:
    """In the forked child: run the task loop on the passed fds, then exit without the server's cleanup."""
    from conveyor.worker.modes.processes.child import child_main  # (preloaded by the server)

    code = 0
    try:
        task_fd, *pipes = fds
        child_main(task_fd, pipes or None, request["log_level"], request["capture"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _reap(statuses: dict[int, int]) -> None:
    """Reap every exited child and write its exit code to its status pipe."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = statuses.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, os.waitstatus_to_exitcode(status).to_bytes(STATUS_BYTES, "little", signed=True))
            except OSError:
                pass  # the worker closed its end: nobody is waiting for the code
            os.close(fd)


def _parent_death_signal(server_pid: int) -> Any:
    """What a child calls first: on Linux, be killed when the fork server exits (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def die_with_parent() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != server_pid:  # the server died between the fork and the prctl
            os._exit(UNKNOWN_EXIT)

    return die_with_parent
