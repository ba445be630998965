"""Large arguments through shared memory, between peers on one host (docs/protocol.md §8, shared memory).

A client on the dispatcher's host writes an argument of SHM_MIN_BYTES or more into a file of its own in
/dev/shm (tmpfs: memory, not disk) and sends only its name; the dispatcher takes the file over (a
rename: the client's name is gone, the dispatcher's name is the job's), maps it, and journals its bytes
from the mapping like any other frame before it acknowledges the job; a worker on the same host gets
the name in ASSIGN and maps the file instead of receiving the bytes over TCP. Peers elsewhere, or
whose /dev/shm is another one (another host, another container), get the bytes as frames, as always.

Who removes a segment: the dispatcher, when it lets go of the job's call (the mapping is collected:
a finalizer unlinks the file), and the client, once ACCEPTED answers the SUBMIT (a no-op when the
dispatcher took it over). A dispatcher killed with -9 leaves its segments behind; the next dispatcher
started in the same pid namespace removes those of dead processes (`sweep`). The bytes themselves are
durable through the journal, never through /dev/shm.

Peers tell whether they share a /dev/shm by `namespace_id()`: the boot id and the device and inode of
/dev/shm, equal only on one host's one tmpfs. CONVEYOR_SHM=0 turns the path off for a process.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
import weakref
from typing import Any

SHM_DIR = "/dev/shm"
SHM_MIN_BYTES = 1 << 20  # arguments this large or larger go through shared memory (below: TCP is as fast)
_PREFIX = "conveyor-"
_NAME = re.compile(r"conveyor-([cd])-([0-9a-f]{1,16})-([0-9]{1,10})-([0-9a-f]{32})\Z")
_namespace: str | None = None
_pidns: str | None = None


def namespace_id() -> str:
    """Who shares this process's /dev/shm: equal for two processes iff each sees the other's files; ""
    when there is no usable /dev/shm (or CONVEYOR_SHM=0)."""
    global _namespace
    if os.environ.get("CONVEYOR_SHM", "1") == "0":
        return ""
    if _namespace is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
            st = os.stat(SHM_DIR)
            ok = stat.S_ISDIR(st.st_mode) and os.access(SHM_DIR, os.W_OK)
            _namespace = f"{boot}:{st.st_dev}:{st.st_ino}" if ok else ""
        except OSError:
            _namespace = ""
    return _namespace


def _pid_namespace() -> str:
    """This process's pid namespace, in segment names: a sweep only judges pids it can see."""
    global _pidns
    if _pidns is None:
        try:
            _pidns = format(os.stat("/proc/self/ns/pid").st_ino, "x")
        except OSError:
            _pidns = "0"
    return _pidns


def _new_name(role: str) -> str:
    return f"{_PREFIX}{role}-{_pid_namespace()}-{os.getpid()}-{os.urandom(16).hex()}"


class Segment(mmap.mmap):
    """A read-only mapping of one segment: a data frame like bytes (the buffer protocol), with its name.

    bytes(segment), which the decoder calls for a large bytes argument, reads the file with one read():
    4x faster here than copying through the mapping, which takes a page fault per 4 KiB."""

    __slots__ = ("name",)
    name: str

    def __bytes__(self) -> bytes:
        try:
            return read_segment(self.name, len(self))
        except OSError:  # removed meanwhile (our mapping still holds the pages)
            with memoryview(self) as view:
                return view.tobytes()


def write_segment(data: Any) -> str | None:
    """A new client segment holding data (one copy); its name, or None if it could not be written (no
    /dev/shm, no space: the argument then goes as a frame)."""
    name = _new_name("c")
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return None
    try:
        view = memoryview(data).cast("B")
        while view.nbytes:
            view = view[os.write(fd, view) :]
    except OSError:  # ENOSPC: tmpfs is full
        os.close(fd)
        remove(name)
        return None
    os.close(fd)
    return name


def _map(path: str, nbytes: int) -> Segment:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != nbytes or nbytes <= 0:
            raise OSError(f"shared-memory segment {os.path.basename(path)} is not {nbytes} bytes")
        return Segment(fd, nbytes, prot=mmap.PROT_READ)
    finally:
        os.close(fd)  # the mapping keeps the pages


def _check(name: str, role: str) -> None:
    m = _NAME.match(name)
    if m is None or m.group(1) != role:
        raise OSError(f"not a shared-memory segment name: {name[:80]!r}")


def adopt(name: str, nbytes: int) -> Segment:
    """The dispatcher takes a client's segment over: renamed to a name of its own, mapped, and removed
    once the mapping is collected. Raises OSError if it is not there or not what the client said."""
    _check(name, "c")
    own = _new_name("d")
    src, dst = os.path.join(SHM_DIR, name), os.path.join(SHM_DIR, own)
    os.rename(src, dst)  # the client's later unlink of its name is then a no-op
    try:
        seg = _map(dst, nbytes)
    except BaseException:
        remove(own)
        raise
    seg.name = own
    weakref.finalize(seg, remove, own)
    return seg


def open_segment(name: str, nbytes: int) -> Segment:
    """A worker maps a dispatcher's segment (read-only; it never removes it), to hand it on by name to a
    processes-mode child: a mapping costs nothing until it is read. Raises OSError."""
    _check(name, "d")
    seg = _map(os.path.join(SHM_DIR, name), nbytes)
    seg.name = name
    return seg


def read_segment(name: str, nbytes: int) -> bytes:
    """A segment as the bytes a task gets, with one read() (a processes-mode child). Raises OSError."""
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != nbytes:
            raise OSError(f"shared-memory segment {name} is not {nbytes} bytes")
        data = os.read(fd, nbytes)
        if len(data) != nbytes:
            raise OSError(f"shared-memory segment {name} is short")
        return data
    finally:
        os.close(fd)


def copy_segment(seg: Segment, out_fd: int) -> None:
    """Write a segment's bytes to a file (the journal's blob) with sendfile: the kernel copies from the
    segment's pages, without faulting them into this process."""
    fd = os.open(os.path.join(SHM_DIR, seg.name), os.O_RDONLY | os.O_NOFOLLOW)
    try:
        offset, size = 0, len(seg)
        while offset < size:
            sent = os.sendfile(out_fd, fd, offset, size - offset)
            if sent == 0:
                raise OSError(f"shared-memory segment {seg.name} is short")
            offset += sent
    finally:
        os.close(fd)


class SegmentUnreadable(OSError):
    """A task's shared-memory argument could not be mapped by its worker."""


def unreadable(message: str) -> None:
    """What a task runs in place of its call when its worker could not map its argument."""
    raise SegmentUnreadable(message)


def remove(name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(SHM_DIR, name))


def sweep() -> int:
    """Remove the segments of processes of this pid namespace that are gone (a dispatcher or a client
    killed with -9). Returns how many."""
    ns, n = _pid_namespace(), 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        m = _NAME.match(name)
        if m is None or m.group(2) != ns:
            continue
        pid = int(m.group(3))
        if pid == os.getpid() or _alive(pid):
            continue
        remove(name)
        n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def offload(frames: list[Any]) -> tuple[list[Any], list[tuple[int, str, int]]]:
    """A client's call frames with the large ones written to segments of their own, left empty in their
    place; and (index, segment name, bytes) for each. Frames that cannot be written stay as they are."""
    out: list[Any] | None = None
    refs: list[tuple[int, str, int]] = []
    for i, frame in enumerate(frames):
        n = memoryview(frame).nbytes
        if n < SHM_MIN_BYTES:
            continue
        name = write_segment(frame)
        if name is None:
            break  # no room in /dev/shm: the rest go as frames too
        if out is None:
            out = list(frames)
        out[i] = b""
        refs.append((i, name, n))
    return (frames if out is None else out), refs
