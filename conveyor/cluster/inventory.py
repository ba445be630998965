"""The inventory file (hosts.toml): its format, and reading and checking it.

deploy/hosts.example.toml documents every key. [defaults] holds settings every [[hosts]] entry
inherits; each [[hosts]] entry is one worker process (unless it says worker = false) on a host reached
with ssh; [dispatcher] says where the dispatcher runs (this machine, or a [[hosts]] entry by name) and
its address as workers see it. load_inventory turns the file into the processes to run, or raises
InventoryError saying what is wrong, and where.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from conveyor.cluster.ssh import Target
from conveyor.errors import InventoryError
from conveyor.protocol.commands import MODE_NAMES

MODES = MODE_NAMES  # interpreters too: its worker refuses to start, in one line, on a Python < 3.12
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEFAULT_STATE_DIR = "~/.local/state/conveyor"

HOST_KEYS = {
    "name", "address", "user", "port", "identity_file", "ssh_options", "connect_timeout", "python", "conveyor",
    "workdir", "state_dir", "env", "mode", "concurrency", "tags", "drain_timeout", "worker_args", "worker", "keys",
}
DEFAULT_KEYS = HOST_KEYS - {"name", "address", "worker"}
DISPATCHER_KEYS = {
    "host", "bind", "address", "journal", "args", "python", "conveyor", "workdir", "state_dir", "env", "keys",
    "insecure",
}


@dataclass
class Process:
    """One long-running conveyor process on a target: a host's worker or the dispatcher."""

    kind: str  # "worker" or "dispatcher"
    name: str
    target: Target
    python: str | None  # run `PYTHON -m conveyor` ...
    conveyor: str | None  # ... or this command
    args: list[str]  # after `conveyor`
    workdir: str
    state_dir: str
    env: dict[str, str]
    stop_timeout: float
    mode: str = ""
    concurrency: int | None = None
    tags: list[str] = field(default_factory=list)

    @property
    def file_stem(self) -> str:
        return "dispatcher" if self.kind == "dispatcher" else f"worker-{self.name}"


@dataclass
class Inventory:
    path: Path
    address: str  # the dispatcher, as workers see it
    dispatcher: Process
    workers: list[Process]

    @property
    def processes(self) -> list[Process]:
        """The dispatcher, then the workers."""
        return [self.dispatcher, *self.workers]


def load_inventory(path: str | Path) -> Inventory:
    """Read and check an inventory file; InventoryError says what is wrong, and where."""
    path = Path(path)
    data = _read_toml(path)
    _check_keys(data, {"defaults", "dispatcher", "hosts"}, str(path))
    defaults = _expect(data.get("defaults", {}), dict, f"{path}: [defaults]")
    _check_keys(defaults, DEFAULT_KEYS, f"{path}: [defaults]")
    hosts = _expect(data.get("hosts", []), list, f"{path}: [[hosts]]")
    disp = _expect(data.get("dispatcher"), dict, f"{path}: [dispatcher]")
    _check_keys(disp, DISPATCHER_KEYS, f"{path}: [dispatcher]")

    address = _expect(disp.get("address"), str, f"{path}: [dispatcher] address (the dispatcher as workers see it)")
    parsed = urlparse(address)
    if parsed.scheme != "tcp" or not parsed.hostname or parsed.port is None:
        raise InventoryError(f"{path}: [dispatcher] address must look like tcp://HOST:PORT, got {address!r}")

    entries = _host_entries(hosts, defaults, path)
    workers = []
    for i, entry in enumerate(entries, 1):
        worker = _worker(entry, address, f"{path}: [[hosts]] #{i} ({entry['name']})")
        if worker is not None:
            workers.append(worker)
    dispatcher = _dispatcher(disp, entries, parsed.port, f"{path}: [dispatcher]")
    return Inventory(path=path, address=address, dispatcher=dispatcher, workers=workers)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InventoryError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"{path}: not valid TOML: {exc}") from None


def _host_entries(hosts: list[Any], defaults: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """Each [[hosts]] entry over [defaults], with its (checked, unique) name."""
    entries: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, raw in enumerate(hosts, 1):
        where = f"{path}: [[hosts]] #{i}"
        entry = {**defaults, **_expect(raw, dict, where)}
        _check_keys(raw, HOST_KEYS, where)
        if "conveyor" in raw and "python" not in raw:  # the entry's own way to run conveyor wins over [defaults]
            entry.pop("python", None)
        host_address = _expect(entry.get("address"), str, f"{where} address")
        name = _expect(entry.get("name", host_address), str, f"{where} name")
        if not NAME_RE.match(name):
            raise InventoryError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-'")
        if name == "dispatcher":
            raise InventoryError(f"{where}: the name \"dispatcher\" is taken by the dispatcher's own line")
        if name in names:
            raise InventoryError(f"{where}: a second host named {name!r} (give each entry its own name)")
        names.add(name)
        entry["name"] = name
        entries.append(entry)
    return entries


def _worker(entry: dict[str, Any], address: str, where: str) -> Process | None:
    """The worker a [[hosts]] entry runs (None with worker = false), connecting to `address`."""
    if not _expect(entry.get("worker", True), bool, f"{where} worker"):
        return None
    mode = _expect(entry.get("mode", "processes"), str, f"{where} mode")
    if mode not in MODES:
        raise InventoryError(f"{where}: mode {mode!r}: choose {', '.join(MODES)}")
    concurrency = entry.get("concurrency")
    if concurrency is not None and _expect(concurrency, int, f"{where} concurrency") < 1:
        raise InventoryError(f"{where}: concurrency must be at least 1")
    tags = _str_list(entry.get("tags", []), f"{where} tags")
    drain = float(_expect(entry.get("drain_timeout", 30), (int, float), f"{where} drain_timeout"))
    args = ["worker", "--name", entry["name"], "--connect", address, "--mode", mode, "--drain-timeout", f"{drain:g}"]
    if concurrency is not None:
        args += ["--concurrency", str(concurrency)]
    for tag in tags:
        args += ["--tag", tag]
    args += _keys_args(entry, where)
    args += _str_list(entry.get("worker_args", []), f"{where} worker_args")
    return Process(
        kind="worker", name=entry["name"], target=_target(entry, where, entry["address"]),
        python=_opt_str(entry, "python", where), conveyor=_opt_str(entry, "conveyor", where),
        args=args, workdir=_opt_str(entry, "workdir", where) or "~",
        state_dir=_opt_str(entry, "state_dir", where) or DEFAULT_STATE_DIR, env=_env(entry, where),
        stop_timeout=drain + 10, mode=mode, concurrency=concurrency, tags=tags,
    )


def _dispatcher(disp: dict[str, Any], entries: list[dict[str, Any]], port: int, where: str) -> Process:
    """The dispatcher [dispatcher] describes: here, or on the host entry it names (whose settings it inherits)."""
    on = _expect(disp.get("host", "local"), str, f"{where} host")
    bind = _expect(disp.get("bind", f"tcp://0.0.0.0:{port}"), str, f"{where} bind")
    args = ["dispatcher", "--bind", bind]
    journal = disp.get("journal")
    if journal is False:
        args.append("--no-journal")
    elif journal is not None:
        args += ["--journal", _expect(journal, str, f"{where} journal")]
    args += _keys_args(disp, where)
    if _expect(disp.get("insecure", False), bool, f"{where} insecure"):
        args.append("--insecure")
    args += _str_list(disp.get("args", []), f"{where} args")
    base: dict[str, Any] = {}
    target = Target()
    if on != "local":
        match = [e for e in entries if e["name"] == on]
        if not match:
            raise InventoryError(f"{where} host {on!r}: use \"local\" or the name of a [[hosts]] entry")
        base = match[0]
        target = _target(base, where, base["address"])
    if "python" in disp or "conveyor" in disp:  # how to run conveyor: the dispatcher's own setting ...
        python, conveyor_cmd = _opt_str(disp, "python", where), _opt_str(disp, "conveyor", where)
    elif on == "local":  # ... else this very Python for a local dispatcher ...
        python, conveyor_cmd = sys.executable, None
    else:  # ... else the named host's
        python, conveyor_cmd = _opt_str(base, "python", where), _opt_str(base, "conveyor", where)
    return Process(
        kind="dispatcher", name="dispatcher", target=target, python=python, conveyor=conveyor_cmd, args=args,
        workdir=_opt_str(disp, "workdir", where) or _opt_str(base, "workdir", where) or "~",
        state_dir=_opt_str(disp, "state_dir", where) or _opt_str(base, "state_dir", where) or DEFAULT_STATE_DIR,
        env={**_env(base, where), **_env(disp, where)}, stop_timeout=30.0,
    )


# --- checking values ---------------------------------------------------------------------------------


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InventoryError(f"{where}: expected {names}, got {value!r}")
    return value


def _opt_str(table: dict[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    return None if value is None else _expect(value, str, f"{where} {key}")


def _str_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = _expect(value, list, where)
    for item in items:
        _expect(item, str, where)
    return list(items)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise InventoryError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(allowed))})")


def _keys_args(table: dict[str, Any], where: str) -> list[str]:
    """`--keys DIR` for a process whose table sets keys."""
    keys = _opt_str(table, "keys", where)
    return [] if keys is None else ["--keys", keys]


def _target(entry: dict[str, Any], where: str, address: str | None) -> Target:
    port = entry.get("port")
    return Target(
        address=address,
        user=_expect(entry["user"], str, f"{where} user") if "user" in entry else None,
        port=_expect(port, int, f"{where} port") if port is not None else None,
        identity_file=_expect(entry["identity_file"], str, f"{where} identity_file") if "identity_file" in entry
        else None,
        ssh_options=_str_list(entry.get("ssh_options", []), f"{where} ssh_options"),
        connect_timeout=float(_expect(entry.get("connect_timeout", 10), (int, float), f"{where} connect_timeout")),
    )


def _env(entry: dict[str, Any], where: str) -> dict[str, str]:
    env = _expect(entry.get("env", {}), dict, f"{where} env")
    out = {}
    for key, value in env.items():
        if not ENV_NAME_RE.match(key):
            raise InventoryError(f"{where} env: bad variable name {key!r}")
        out[key] = str(value)
    return out
