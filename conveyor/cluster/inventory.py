"""The inventory file (hosts.toml): its format, and reading and checking it.

deploy/hosts.example.toml documents every key. [defaults] holds settings every [[hosts]] entry
inherits; each [[hosts]] entry is one worker process (unless it says worker = false) on a host reached
with ssh; [dispatcher] says where the dispatcher runs (this machine, or a [[hosts]] entry by name) and
its address as workers see it. An optional [backup] makes [dispatcher] the primary of a standby pair
(docs/standby.md), and an optional [witness] adds the pair's third vote. load_inventory turns the file
into the processes to run, or raises InventoryError saying what is wrong, and where.
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
    "insecure", "pair_bind", "pair_address", "failover_timeout",
}
PAIR_KEYS = ("pair_bind", "pair_address", "failover_timeout")  # on [dispatcher]: only with a [backup]
BACKUP_KEYS = DISPATCHER_KEYS - {"failover_timeout"}  # the pair's failover timeout is set once, on [dispatcher]
WITNESS_KEYS = {"host", "bind", "address", "state", "keys", "args", "python", "conveyor", "workdir", "state_dir", "env"}
DEFAULT_FAILOVER_TIMEOUT = 2.0  # `conveyor dispatcher --failover-timeout`'s default


@dataclass
class Process:
    """One long-running conveyor process on a target: a host's worker, a dispatcher or the witness."""

    kind: str  # "worker", "dispatcher" (the only one, or either of a pair) or "witness"
    name: str  # a host entry's name; "dispatcher", "backup" or "witness"
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
    address: str = ""  # a dispatcher's or the witness's address, as the others see it
    role: str = ""  # a dispatcher of a standby pair: "primary" or "backup"

    @property
    def file_stem(self) -> str:
        """Its pid and log files' name in the state directory."""
        if self.kind == "worker":
            return f"worker-{self.name}"
        return "dispatcher-backup" if self.name == "backup" else self.name


@dataclass
class Inventory:
    path: Path
    address: str  # the dispatcher (of a pair: the primary), as workers see it
    dispatcher: Process
    workers: list[Process]
    backup: Process | None = None  # a standby pair's backup dispatcher
    witness: Process | None = None  # the pair's third vote

    @property
    def dispatchers(self) -> list[Process]:
        """The dispatcher, and the backup of a pair."""
        return [self.dispatcher, *([self.backup] if self.backup is not None else [])]

    @property
    def addresses(self) -> list[str]:
        """The dispatchers' addresses as workers see them (workers get them as `--connect a,b`)."""
        return [p.address for p in self.dispatchers]

    @property
    def services(self) -> list[Process]:
        """What `up` starts before the workers, in order: the witness, the dispatcher, the backup."""
        return [*([self.witness] if self.witness is not None else []), *self.dispatchers]

    @property
    def processes(self) -> list[Process]:
        """The witness, the dispatchers, then the workers."""
        return [*self.services, *self.workers]


def load_inventory(path: str | Path) -> Inventory:
    """Read and check an inventory file; InventoryError says what is wrong, and where."""
    path = Path(path)
    data = _read_toml(path)
    _check_keys(data, {"defaults", "dispatcher", "backup", "witness", "hosts"}, str(path))
    defaults = _expect(data.get("defaults", {}), dict, f"{path}: [defaults]")
    _check_keys(defaults, DEFAULT_KEYS, f"{path}: [defaults]")
    hosts = _expect(data.get("hosts", []), list, f"{path}: [[hosts]]")
    disp = _expect(data.get("dispatcher"), dict, f"{path}: [dispatcher]")
    _check_keys(disp, DISPATCHER_KEYS, f"{path}: [dispatcher]")
    backup = data.get("backup")
    if backup is not None:
        _check_keys(_expect(backup, dict, f"{path}: [backup]"), BACKUP_KEYS, f"{path}: [backup]")
    witness = data.get("witness")
    if witness is not None:
        _check_keys(_expect(witness, dict, f"{path}: [witness]"), WITNESS_KEYS, f"{path}: [witness]")
        if backup is None:
            raise InventoryError(f"{path}: [witness] is the third vote of a standby pair: add a [backup] dispatcher "
                                 "or remove [witness]")
    if backup is None:
        for key in PAIR_KEYS:
            if key in disp:
                raise InventoryError(f"{path}: [dispatcher] {key} is for a standby pair: add a [backup] dispatcher "
                                     f"or remove {key}")

    address, port = _service_address(disp, f"{path}: [dispatcher]", "the dispatcher as workers see it")
    addresses = [address]
    if backup is not None:
        backup_address, _ = _service_address(backup, f"{path}: [backup]", "the backup as workers see it")
        if backup_address == address:
            raise InventoryError(f"{path}: [backup] address {backup_address!r} is the [dispatcher]'s too: "
                                 "each dispatcher of the pair needs its own")
        addresses.append(backup_address)
    reserved = {"dispatcher": "[dispatcher]"}
    if backup is not None:
        reserved["backup"] = "[backup]"
    if witness is not None:
        reserved["witness"] = "[witness]"

    entries = _host_entries(hosts, defaults, path, reserved)
    workers = []
    for i, entry in enumerate(entries, 1):
        worker = _worker(entry, ",".join(addresses), f"{path}: [[hosts]] #{i} ({entry['name']})")
        if worker is not None:
            workers.append(worker)
    if backup is None:
        dispatcher = _dispatcher(disp, entries, port, f"{path}: [dispatcher]")
        return Inventory(path=path, address=address, dispatcher=dispatcher, workers=workers)
    primary, second, third = _pair(disp, backup, witness, entries, path)
    return Inventory(path=path, address=address, dispatcher=primary, workers=workers, backup=second, witness=third)


def _service_address(table: dict[str, Any], where: str, what: str) -> tuple[str, int]:
    """A table's required `address` (tcp://HOST:PORT) and its port."""
    address = _expect(table.get("address"), str, f"{where} address ({what})")
    port = _tcp_port(address)
    if port is None:
        raise InventoryError(f"{where} address must look like tcp://HOST:PORT, got {address!r}")
    return address, port


def _tcp_port(address: str) -> int | None:
    """The port of a tcp://HOST:PORT address; None if it is not one."""
    try:
        parsed = urlparse(address)
        port = parsed.port
    except ValueError:  # a port out of range or not a number
        return None
    return port if parsed.scheme == "tcp" and parsed.hostname and port is not None else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InventoryError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"{path}: not valid TOML: {exc}") from None


def _host_entries(
    hosts: list[Any], defaults: dict[str, Any], path: Path, reserved: dict[str, str],
) -> list[dict[str, Any]]:
    """Each [[hosts]] entry over [defaults], with its (checked, unique) name; `reserved`: names of other lines."""
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
        if name in reserved:
            raise InventoryError(f"{where}: the name \"{name}\" is taken by {reserved[name]}'s own line")
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
    bind = _expect(disp.get("bind", f"tcp://0.0.0.0:{port}"), str, f"{where} bind")
    args = ["dispatcher", "--bind", bind, *_journal_args(disp, where), *_security_args(disp, where),
            *_str_list(disp.get("args", []), f"{where} args")]
    return _service(disp, entries, where, kind="dispatcher", name="dispatcher", args=args, address=disp["address"])


def _pair(
    disp: dict[str, Any], backup: dict[str, Any], witness: dict[str, Any] | None, entries: list[dict[str, Any]],
    path: Path,
) -> tuple[Process, Process, Process | None]:
    """A standby pair: [dispatcher] as the primary, [backup], and the [witness] if there is one."""
    where = {"primary": f"{path}: [dispatcher]", "backup": f"{path}: [backup]", "witness": f"{path}: [witness]"}
    tables = {"primary": disp, "backup": backup}
    timeout = float(_expect(disp.get("failover_timeout", DEFAULT_FAILOVER_TIMEOUT), (int, float),
                            f"{where['primary']} failover_timeout"))
    if not timeout > 0:
        raise InventoryError(f"{where['primary']} failover_timeout must be a positive number of seconds, "
                             f"got {disp['failover_timeout']!r}")
    binds: dict[str, str] = {}
    pair_binds: dict[str, str] = {}
    pair_addresses: dict[str, str] = {}
    for role, table in tables.items():
        w = where[role]
        if table.get("journal") is False:
            raise InventoryError(f"{w} journal = false: a standby pair ships its journal to the other dispatcher "
                                 "(give it a journal file, or remove [backup])")
        address = table["address"]
        binds[role] = _expect(table.get("bind", f"tcp://0.0.0.0:{_tcp_port(address)}"), str, f"{w} bind")
        bind_port = _tcp_port(binds[role])
        if not bind_port:
            raise InventoryError(f"{w} bind must look like tcp://HOST:PORT with a fixed port in a standby pair, "
                                 f"got {binds[role]!r}")
        pair_binds[role] = _expect(table.get("pair_bind", f"{binds[role].rpartition(':')[0]}:{bind_port + 1}"), str,
                                   f"{w} pair_bind")
        pair_port = _tcp_port(pair_binds[role])
        if not pair_port:
            raise InventoryError(f"{w} pair_bind must look like tcp://HOST:PORT with a fixed port, "
                                 f"got {pair_binds[role]!r}")
        if pair_port == bind_port:
            raise InventoryError(f"{w} pair_bind {pair_binds[role]!r} has the port of bind {binds[role]!r}: "
                                 "the pair's link needs a port of its own")
        pair_addresses[role] = _expect(table.get("pair_address", f"{address.rpartition(':')[0]}:{pair_port}"), str,
                                       f"{w} pair_address")
        if _tcp_port(pair_addresses[role]) is None:
            raise InventoryError(f"{w} pair_address must look like tcp://HOST:PORT, got {pair_addresses[role]!r}")
    keyed = {role: "keys" in table for role, table in tables.items()}
    if keyed["primary"] != keyed["backup"]:
        has, lacks = ("dispatcher", "backup") if keyed["primary"] else ("backup", "dispatcher")
        raise InventoryError(f"{path}: [{has}] sets keys but [{lacks}] does not: the pair's link uses the "
                             "dispatcher key pair, so give both the same key directory (copied to each host)")

    witness_proc = None
    witness_args: list[str] = []
    if witness is not None:
        w = where["witness"]
        address, port = _service_address(witness, w, "the witness as the dispatchers see it")
        bind = _expect(witness.get("bind", f"tcp://0.0.0.0:{port}"), str, f"{w} bind")
        if not _tcp_port(bind):
            raise InventoryError(f"{w} bind must look like tcp://HOST:PORT with a fixed port, got {bind!r}")
        if keyed["primary"] and "keys" not in witness:
            raise InventoryError(f"{w}: the dispatchers use keys, so set keys here too (the dispatcher key "
                                 "directory): they speak CURVE to the witness")
        if "keys" in witness and not keyed["primary"]:
            raise InventoryError(f"{w} keys: the dispatchers use no keys, so the witness cannot either "
                                 "(remove it, or give [dispatcher] and [backup] keys)")
        state_dir = _opt_str(witness, "state_dir", w) or DEFAULT_STATE_DIR
        state = _expect(witness.get("state", f"{state_dir.rstrip('/')}/witness.epoch"), str, f"{w} state")
        args = ["witness", "--bind", bind, "--state", state, "--failover-timeout", f"{timeout:g}",
                *_keys_args(witness, w), *_str_list(witness.get("args", []), f"{w} args")]
        witness_proc = _service(witness, entries, w, kind="witness", name="witness", args=args, address=address)
        witness_args = ["--witness", address]

    procs: dict[str, Process] = {}
    for role, other in (("primary", "backup"), ("backup", "primary")):
        table, w = tables[role], where[role]
        args = ["dispatcher", "--bind", binds[role], *_journal_args(table, w), "--role", role,
                "--peer", pair_addresses[other], "--pair-bind", pair_binds[role],
                "--failover-timeout", f"{timeout:g}", *witness_args, *_security_args(table, w),
                *_str_list(table.get("args", []), f"{w} args")]
        procs[role] = _service(table, entries, w, kind="dispatcher", name="dispatcher" if role == "primary"
                               else "backup", args=args, address=table["address"], role=role)
    _check_same_host(procs, witness_proc, binds, pair_binds, tables, where)
    return procs["primary"], procs["backup"], witness_proc


def _check_same_host(
    procs: dict[str, Process], witness: Process | None, binds: dict[str, str], pair_binds: dict[str, str],
    tables: dict[str, dict[str, Any]], where: dict[str, str],
) -> None:
    """Two dispatchers (or one and the witness) on one host need ports and journals of their own."""
    primary, backup = procs["primary"], procs["backup"]
    ports: dict[str, list[tuple[int | None, str]]] = {}
    for role, proc in procs.items():
        ports.setdefault(proc.target.label(), []).extend([
            (_tcp_port(binds[role]), f"{where[role]} bind"), (_tcp_port(pair_binds[role]), f"{where[role]} pair_bind"),
        ])
    if witness is not None:
        ports.setdefault(witness.target.label(), []).append((_tcp_port(witness.args[2]), f"{where['witness']} bind"))
    for taken in ports.values():
        first: dict[int | None, str] = {}
        for port, what in taken:
            if port in first:
                raise InventoryError(f"{what}: port {port} is also {first[port].partition(': ')[2]} on the same "
                                     "host: give each its own port")
            first[port] = what
    if primary.target.label() == backup.target.label() and tables["primary"].get("journal") == \
            tables["backup"].get("journal"):
        raise InventoryError(f"{where['backup']} journal: the same file as [dispatcher]'s on the same host "
                             "(each dispatcher of the pair needs its own journal: set journal)")


def _service(
    table: dict[str, Any], entries: list[dict[str, Any]], where: str, *, kind: str, name: str, args: list[str],
    address: str, role: str = "",
) -> Process:
    """A dispatcher or the witness: here, or on the host entry it names (whose settings it inherits)."""
    on = _expect(table.get("host", "local"), str, f"{where} host")
    base: dict[str, Any] = {}
    target = Target()
    if on != "local":
        match = [e for e in entries if e["name"] == on]
        if not match:
            raise InventoryError(f"{where} host {on!r}: use \"local\" or the name of a [[hosts]] entry")
        base = match[0]
        target = _target(base, where, base["address"])
    if "python" in table or "conveyor" in table:  # how to run conveyor: the table's own setting ...
        python, conveyor_cmd = _opt_str(table, "python", where), _opt_str(table, "conveyor", where)
    elif on == "local":  # ... else this very Python for a local process ...
        python, conveyor_cmd = sys.executable, None
    else:  # ... else the named host's
        python, conveyor_cmd = _opt_str(base, "python", where), _opt_str(base, "conveyor", where)
    return Process(
        kind=kind, name=name, target=target, python=python, conveyor=conveyor_cmd, args=args,
        workdir=_opt_str(table, "workdir", where) or _opt_str(base, "workdir", where) or "~",
        state_dir=_opt_str(table, "state_dir", where) or _opt_str(base, "state_dir", where) or DEFAULT_STATE_DIR,
        env={**_env(base, where), **_env(table, where)}, stop_timeout=30.0, address=address, role=role,
    )


def _journal_args(table: dict[str, Any], where: str) -> list[str]:
    journal = table.get("journal")
    if journal is False:
        return ["--no-journal"]
    return [] if journal is None else ["--journal", _expect(journal, str, f"{where} journal")]


def _security_args(table: dict[str, Any], where: str) -> list[str]:
    """A dispatcher's `--keys DIR` and/or `--insecure`."""
    insecure = _expect(table.get("insecure", False), bool, f"{where} insecure")
    return [*_keys_args(table, where), *(["--insecure"] if insecure else [])]


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
