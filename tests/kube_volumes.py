"""Secret and ConfigMap volumes laid out as the kubelet lays them out, for tests without a kubelet.

The kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go) writes each version of a volume's files into a
new hidden timestamped directory, points the `..data` symlink at it by renaming a `..data_tmp` symlink over it
(atomic), and makes each top-level name a symlink into `..data`:

    VOLUME/..2026_12_02_10_00_00.123456789/worker.key     the files of this version
    VOLUME/..data -> ..2026_12_02_10_00_00.123456789
    VOLUME/worker.key -> ..data/worker.key

An update writes a new timestamped directory, swaps `..data`, adds symlinks for new names, removes the old
directory, then the symlinks of names that are gone. With a pod fsGroup, SetVolumeOwnership
(pkg/volume/volume_linux.go) then gives every file that group and adds group read (0440 for read-only
volumes), and directories setgid and group execute.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path

DATA = "..data"
RO_MASK = 0o440
RW_MASK = 0o660
EXEC_MASK = 0o110


def set_volume_ownership(root: Path, fs_group: int | None, read_only: bool) -> None:
    """What the kubelet does to a volume of a pod with an fsGroup, before the containers see it."""
    if fs_group is None:
        return
    mask = RO_MASK if read_only else RW_MASK
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            _change(Path(dirpath) / name, fs_group, mask)
    _change(root, fs_group, mask)


def _change(path: Path, fs_group: int, mask: int) -> None:
    os.lchown(path, -1, fs_group)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return  # chmod would follow it and change the file's mode
    extra = mask | (stat.S_ISGID | EXEC_MASK if stat.S_ISDIR(info.st_mode) else 0)
    os.chmod(path, stat.S_IMODE(info.st_mode) | extra)


class AtomicVolume:
    """One Secret or ConfigMap volume directory; `write()` is one sync of the kubelet."""

    def __init__(self, root: Path, fs_group: int | None = None):
        self.root = root
        self.fs_group = fs_group
        root.mkdir(parents=True, exist_ok=True)

    def current(self) -> Path | None:
        """The timestamped directory `..data` points at (None before the first write)."""
        link = self.root / DATA
        return self.root / os.readlink(link) if link.is_symlink() else None

    def write(self, files: dict[str, tuple[bytes, int]]) -> None:
        """Make the volume hold exactly `files` (relative path -> (content, mode))."""
        old_dir = self.current()
        old_names = {p.name for p in self.root.iterdir() if not p.name.startswith("..")}
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
        new_dir = Path(tempfile.mkdtemp(prefix=stamp, dir=self.root))
        os.chmod(new_dir, 0o755)  # so group and others can walk the tree, as the kubelet does
        for rel, (content, mode) in files.items():
            path = new_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            path.write_bytes(content)
            os.chmod(path, mode)
        set_volume_ownership(self.root, self.fs_group, read_only=True)
        tmp_link = self.root / f"{DATA}_tmp"
        tmp_link.symlink_to(new_dir.name)
        os.rename(tmp_link, self.root / DATA)  # the atomic swap
        new_names = {Path(rel).parts[0] for rel in files}
        for name in sorted(new_names - old_names):
            (self.root / name).symlink_to(f"{DATA}/{name}")
        if old_dir is not None:
            _remove_tree(old_dir)
        for name in sorted(old_names - new_names):
            (self.root / name).unlink()


def _remove_tree(path: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))
    os.rmdir(path)
