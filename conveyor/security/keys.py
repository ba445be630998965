"""CurveZMQ key files: one directory holds everything a dispatcher, a worker and a client need.

    DIR/
      dispatcher.key              the dispatcher's public key: every host needs it
      dispatcher.key_secret       the dispatcher's key pair (mode 0600): the dispatcher's host only
      worker.key, worker.key_secret   a worker's key pair: worker hosts
      client.key, client.key_secret   a client's key pair: client hosts
      authorized/workers/NAME.key     public keys the dispatcher accepts as workers (the dispatcher's host)
      authorized/clients/NAME.key     public keys the dispatcher accepts as clients
      hosts/NAME/                     made by `conveyor keys add-worker/add-client`: copy it to host NAME

`conveyor keys init DIR` creates the three key pairs and authorizes the worker and client keys, so
DIR alone serves a dispatcher, a worker and a client on one host. A `hosts/NAME` directory has the
same layout (dispatcher.key plus worker.* and/or client.*), so it works as `--keys` on that host.

Files use ZeroMQ's certificate format (what `zmq.auth.create_certificates` writes, readable with
`zmq.auth.load_certificate`); a public key file may also hold just the 40-character Z85 key.
Secret files are created with mode 0600 and never overwritten. Nothing here touches a socket.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from conveyor.errors import KeysError

log = logging.getLogger("conveyor.keys")

ENV_KEYS = "CONVEYOR_KEYS"
ROLES = ("worker", "client")
AUTHORIZED = "authorized"
HOSTS = "hosts"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_LINE = re.compile(r'^\s*(public|secret)-key\s*=\s*"([^"]*)"\s*$', re.MULTILINE)
_Z85_KEY = re.compile(r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


def authorized_dir(root: Path, role: str) -> Path:
    """Where the public keys the dispatcher accepts in `role` ("worker" or "client") live."""
    return root / AUTHORIZED / f"{role}s"


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """What a worker or client socket needs: its own key pair and the dispatcher's public key (Z85)."""

    role: str
    public: bytes
    secret: bytes
    server_public: bytes
    directory: Path


@dataclass(frozen=True, slots=True)
class DispatcherCredentials:
    """The dispatcher's key pair and the directory whose authorized/ folders it accepts."""

    public: bytes
    secret: bytes
    directory: Path


# --- reading ---------------------------------------------------------------------------------------


def _z85_key(text: str, path: Path) -> bytes:
    import zmq.utils.z85

    if not _Z85_KEY.match(text):
        raise KeysError(f"{path}: not a CurveZMQ key (expected 40 Z85 characters)")
    key = text.encode("ascii")
    try:
        if len(zmq.utils.z85.decode(key)) == 32:
            return key
    except (ValueError, KeyError, IndexError):
        pass
    raise KeysError(f"{path}: not a CurveZMQ key (expected 40 Z85 characters)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise KeysError(f"{path} not found") from None
    except OSError as exc:
        raise KeysError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_public_key(path: Path) -> bytes:
    """The Z85 public key in a certificate file (or a file holding just the key)."""
    text = _read_text(path)
    found = dict((kind, value) for kind, value in _KEY_LINE.findall(text))
    if "public" in found:
        return _z85_key(found["public"], path)
    stripped = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(stripped) == 1:
        return _z85_key(stripped[0], path)
    raise KeysError(f"{path}: no public-key in this file")


def read_key_pair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a secret certificate file; warns if other users can read it."""
    import zmq

    text = _read_text(path)
    found = dict((kind, value) for kind, value in _KEY_LINE.findall(text))
    if "secret" not in found:
        raise KeysError(f"{path}: no secret-key in this file")
    secret = _z85_key(found["secret"], path)
    public = zmq.curve_public(secret)
    if "public" in found and _z85_key(found["public"], path) != public:
        raise KeysError(f"{path}: its public-key does not belong to its secret-key")
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if mode & 0o077 and not _read_only(path):  # a read-only mount (a Kubernetes Secret): the advice cannot be followed
        log.warning("%s can be read by other users (mode %o): run `chmod 600 %s`", path, mode & 0o777, path)
    return public, secret


def _own_key_pair(directory: str | os.PathLike[str], name: str, why_missing: str) -> tuple[Path, bytes, bytes]:
    """DIR, and the public and secret key in DIR/NAME.key_secret.

    Raises KeysError saying what to do if DIR or the file is missing; for the file, "DIR <why_missing>".
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise KeysError(f"key directory {root} not found (create one with `conveyor keys init {root}`)")
    secret_file = root / f"{name}{SECRET_SUFFIX}"
    if not secret_file.exists():
        raise KeysError(f"{secret_file} not found: {root} {why_missing}")
    public, secret = read_key_pair(secret_file)
    return root, public, secret


def load_peer_credentials(directory: str | os.PathLike[str], role: str) -> PeerCredentials:
    """A worker's or client's keys from DIR: DIR/<role>.key_secret and DIR/dispatcher.key."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    root, public, secret = _own_key_pair(
        directory, role,
        f"holds no {role} key "
        f"(`conveyor keys init DIR` makes one; `conveyor keys add-{role} DIR NAME` makes one for another host)",
    )
    server_file = root / f"dispatcher{PUBLIC_SUFFIX}"
    if not server_file.exists():
        raise KeysError(f"{server_file} not found: copy the dispatcher's public key there")
    return PeerCredentials(role, public, secret, read_public_key(server_file), root)


def load_dispatcher_credentials(directory: str | os.PathLike[str]) -> DispatcherCredentials:
    """The dispatcher's key pair from DIR/dispatcher.key_secret; DIR/authorized/ lists who may connect."""
    root, public, secret = _own_key_pair(
        directory, "dispatcher", "is not a dispatcher's key directory (create one with `conveyor keys init DIR`)"
    )
    for role in ROLES:
        if not authorized_dir(root, role).is_dir():
            log.warning("%s does not exist: no %s can connect", authorized_dir(root, role), role)
    return DispatcherCredentials(public, secret, root)


# --- writing ---------------------------------------------------------------------------------------


def _header(kind: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"#   ****  Generated on {now} by conveyor  ****\n#   ZeroMQ CURVE {kind} Certificate\n\n"


def _create(path: Path, text: str, mode: int) -> None:
    """Create a new file with this mode (never replacing one), whatever the umask."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeysError(f"{path} already exists; not overwriting it") from None
    except OSError as exc:
        raise KeysError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def write_public(path: Path, public: bytes) -> None:
    text = _header("Public") + f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    _create(path, text, 0o644)


def write_pair(directory: Path, name: str) -> tuple[bytes, bytes]:
    """A new key pair as DIR/NAME.key (public, 0644) and DIR/NAME.key_secret (0600)."""
    import zmq

    public, secret = zmq.curve_keypair()
    for path in (directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"):
        if path.exists():
            raise KeysError(f"{path} already exists; not overwriting it")
    text = _header("Secret") + (
        f'metadata\ncurve\n    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()}"\n'
    )
    _create(directory / f"{name}{SECRET_SUFFIX}", text, 0o600)
    write_public(directory / f"{name}{PUBLIC_SUFFIX}", public)
    return public, secret


def _mkdir(path: Path, mode: int = 0o700) -> None:
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeysError(f"cannot create {path}: {exc.strerror or exc}") from None


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise KeysError(f"bad name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    return name


def init_directory(directory: str | os.PathLike[str]) -> list[Path]:
    """Create DIR with a dispatcher, a worker and a client key pair, the latter two authorized."""
    root = Path(directory).expanduser()
    if (root / f"dispatcher{SECRET_SUFFIX}").exists():
        raise KeysError(f"{root} already holds a dispatcher key; not overwriting it")
    _mkdir(root)
    for role in ROLES:
        _mkdir(authorized_dir(root, role))
    write_pair(root, "dispatcher")
    created = [root / f"dispatcher{PUBLIC_SUFFIX}", root / f"dispatcher{SECRET_SUFFIX}"]
    for role in ROLES:
        public, _ = write_pair(root, role)
        target = authorized_dir(root, role) / f"{role}{PUBLIC_SUFFIX}"
        write_public(target, public)
        created += [root / f"{role}{PUBLIC_SUFFIX}", root / f"{role}{SECRET_SUFFIX}", target]
    return created


def add_peer(
    directory: str | os.PathLike[str], role: str, name: str, public_key_file: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Authorize one more worker or client key under NAME.

    With public_key_file, that existing public key is authorized. Otherwise a new pair is made in
    DIR/hosts/NAME/ (with a copy of dispatcher.key), a directory to copy to that host as its --keys.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    root = Path(directory).expanduser()
    check_name(name)
    server = root / f"dispatcher{PUBLIC_SUFFIX}"
    if not server.exists():
        raise KeysError(f"{server} not found: run `conveyor keys init {root}` first")
    target = authorized_dir(root, role) / f"{name}{PUBLIC_SUFFIX}"
    if target.exists():
        raise KeysError(f"{target} already exists: a {role} named {name!r} is already authorized")
    _mkdir(authorized_dir(root, role))
    if public_key_file is not None:
        public = read_public_key(Path(public_key_file).expanduser())
        write_public(target, public)
        return [target]
    host = root / HOSTS / name
    _mkdir(host)
    public, _ = write_pair(host, role)
    created = [host / f"{role}{PUBLIC_SUFFIX}", host / f"{role}{SECRET_SUFFIX}"]
    if not (host / server.name).exists():
        shutil.copyfile(server, host / server.name)
        os.chmod(host / server.name, 0o644)
        created.append(host / server.name)
    write_public(target, public)
    created.append(target)
    return created


def revoke(directory: str | os.PathLike[str], role: str, name: str) -> Path:
    """Stop accepting the key authorized as NAME (a running dispatcher notices within a heartbeat)."""
    target = authorized_dir(Path(directory).expanduser(), role) / f"{check_name(name)}{PUBLIC_SUFFIX}"
    try:
        target.unlink()
    except FileNotFoundError:
        raise KeysError(f"{target} not found: no {role} named {name!r} is authorized") from None
    return target


def list_authorized(directory: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """(role, name, public key or an error) for every file in DIR/authorized/."""
    root = Path(directory).expanduser()
    out = []
    for role in ROLES:
        folder = authorized_dir(root, role)
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")):
            try:
                key = read_public_key(path).decode()
            except KeysError as exc:
                key = f"invalid: {exc}"
            out.append((role, path.name[: -len(PUBLIC_SUFFIX)], key))
    return out


def _read_only(path: Path) -> bool:
    """Whether path is on a read-only file system."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
