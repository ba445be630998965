"""`conveyor cluster up|status|down HOSTS.toml`: a dispatcher and workers on many hosts, over SSH.

The inventory (deploy/hosts.example.toml documents every key) lists the hosts, how to reach them
and how to run `conveyor` there, each host's worker mode, concurrency and tags, and where the
dispatcher runs (this machine, or one of the hosts) with its address as workers see it.

Everything runs through the system `ssh` client, so the user's keys, agent and ~/.ssh/config apply
(with BatchMode=yes: never a password prompt, and a ConnectTimeout). Each command sends a short
POSIX `sh` script to `sh -s` on the host. A worker is started detached (setsid + nohup) so it outlives
the SSH session, with a pid file and a log file in the host's state directory; `up` finds a running
worker by its pid file and process and leaves it alone, so running it twice starts nothing twice.
`down` stops workers first (SIGTERM: they drain, then exit), waits, kills what outlives the timeout,
then stops the dispatcher. Each host gets one line: started / already running / unreachable /
conveyor missing / wrong Python / failed, and for `status` running / not running plus what the
dispatcher sees.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import typer

app = typer.Typer(
    name="cluster",
    help="Run a dispatcher and workers on many hosts over SSH, from an inventory file (hosts.toml).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODES = ("threads", "processes", "asyncio")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MARK = "@@conveyor"  # prefix of the one line a remote script reports its outcome with
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


class InventoryError(Exception):
    """The inventory file is missing, malformed or inconsistent."""


# --- the inventory ---------------------------------------------------------------------------------


@dataclass
class Target:
    """Where a command runs: this machine (address None) or a host reached with `ssh`."""

    address: str | None = None
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    ssh_options: list[str] = field(default_factory=list)
    connect_timeout: float = 10.0

    @property
    def is_local(self) -> bool:
        return self.address is None

    def label(self) -> str:
        if self.address is None:
            return "local"
        text = f"{self.user}@{self.address}" if self.user else self.address
        return f"{text}:{self.port}" if self.port else text

    def command(self) -> list[str]:
        """The command line that runs a script read from stdin on this target."""
        if self.address is None:
            return ["sh", "-s"]
        cmd = [
            "ssh", "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(self.connect_timeout))}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR",
        ]
        if self.port:
            cmd += ["-p", str(self.port)]
        if self.user:
            cmd += ["-l", self.user]
        if self.identity_file:
            cmd += ["-i", os.path.expanduser(self.identity_file)]
        return [*cmd, *self.ssh_options, "--", self.address, "sh -s"]


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

    def where(self, filename: str) -> str:
        return f"{self.state_dir.rstrip('/')}/{filename}"


@dataclass
class Inventory:
    path: Path
    address: str  # the dispatcher, as workers see it
    dispatcher: Process
    workers: list[Process]


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InventoryError(f"{where}: expected {names}, got {value!r}")
    return value


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
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise InventoryError(f"{where} env: bad variable name {key!r}")
        out[key] = str(value)
    return out


def load_inventory(path: str | Path) -> Inventory:
    """Read and check an inventory file; InventoryError says what is wrong, and where."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InventoryError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"{path}: not valid TOML: {exc}") from None
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

    workers = []
    for i, entry in enumerate(entries, 1):
        where = f"{path}: [[hosts]] #{i} ({entry['name']})"
        if not _expect(entry.get("worker", True), bool, f"{where} worker"):
            continue
        mode = _expect(entry.get("mode", "processes"), str, f"{where} mode")
        if mode not in MODES:
            raise InventoryError(f"{where}: mode {mode!r}: choose {', '.join(MODES)}")
        concurrency = entry.get("concurrency")
        if concurrency is not None and _expect(concurrency, int, f"{where} concurrency") < 1:
            raise InventoryError(f"{where}: concurrency must be at least 1")
        tags = _str_list(entry.get("tags", []), f"{where} tags")
        drain = float(_expect(entry.get("drain_timeout", 30), (int, float), f"{where} drain_timeout"))
        args = ["worker", "--name", entry["name"], "--connect", address, "--mode", mode,
                "--drain-timeout", f"{drain:g}"]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency)]
        for tag in tags:
            args += ["--tag", tag]
        if entry.get("keys") is not None:
            args += ["--keys", _expect(entry["keys"], str, f"{where} keys")]
        args += _str_list(entry.get("worker_args", []), f"{where} worker_args")
        workers.append(Process(
            kind="worker", name=entry["name"], target=_target(entry, where, entry["address"]),
            python=_opt_str(entry, "python", where), conveyor=_opt_str(entry, "conveyor", where),
            args=args, workdir=_opt_str(entry, "workdir", where) or "~",
            state_dir=_opt_str(entry, "state_dir", where) or DEFAULT_STATE_DIR, env=_env(entry, where),
            stop_timeout=drain + 10, mode=mode, concurrency=concurrency, tags=tags,
        ))

    where = f"{path}: [dispatcher]"
    on = _expect(disp.get("host", "local"), str, f"{where} host")
    bind = _expect(disp.get("bind", f"tcp://0.0.0.0:{parsed.port}"), str, f"{where} bind")
    dargs = ["dispatcher", "--bind", bind]
    journal = disp.get("journal")
    if journal is False:
        dargs.append("--no-journal")
    elif journal is not None:
        dargs += ["--journal", _expect(journal, str, f"{where} journal")]
    if disp.get("keys") is not None:
        dargs += ["--keys", _expect(disp["keys"], str, f"{where} keys")]
    if _expect(disp.get("insecure", False), bool, f"{where} insecure"):
        dargs.append("--insecure")
    dargs += _str_list(disp.get("args", []), f"{where} args")
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
    dispatcher = Process(
        kind="dispatcher", name="dispatcher", target=target, python=python, conveyor=conveyor_cmd, args=dargs,
        workdir=_opt_str(disp, "workdir", where) or _opt_str(base, "workdir", where) or "~",
        state_dir=_opt_str(disp, "state_dir", where) or _opt_str(base, "state_dir", where) or DEFAULT_STATE_DIR,
        env={**_env(base, where), **_env(disp, where)}, stop_timeout=30.0,
    )
    return Inventory(path=path, address=address, dispatcher=dispatcher, workers=workers)


def _opt_str(table: dict[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    return None if value is None else _expect(value, str, f"{where} {key}")


# --- the scripts run on each host ------------------------------------------------------------------


def sh_word(word: str) -> str:
    """Quote a word for sh, letting a leading ~/ mean the remote user's home."""
    if word == "~":
        return '"$HOME"'
    if word.startswith("~/"):
        return '"$HOME"/' + shlex.quote(word[2:])
    return shlex.quote(word)


_PREAMBLE = r"""
set -u
report() { printf '%s %s\n' "@@conveyor" "$*"; exit 0; }
nap() { sleep 0.2 2>/dev/null || sleep 1; }
alive() {  # the pid runs and is not a zombie
    kill -0 "$1" 2>/dev/null || return 1
    if [ -r "/proc/$1/status" ]; then
        case "$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" in Z|X) return 1;; esac
    fi
    return 0
}
running_pid() {  # the pid in the pid file, if that process runs and is ours
    [ -f "$PIDFILE" ] || return 1
    pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
    case "$pid" in ''|*[!0-9]*) return 1;; esac
    alive "$pid" || return 1
    if [ -r "/proc/$pid/cmdline" ]; then
        cmdline=$(tr '\000' ' ' < "/proc/$pid/cmdline" 2>/dev/null)
        case "$cmdline" in *"$MARK1"*"$MARK2"*) ;; *) return 1;; esac
    fi
    echo "$pid"
}
"""

_PROBE_PYTHON = r"""
if ! command -v "$PY" >/dev/null 2>&1; then report wrong-python "$PY not found"; fi
pyver=$("$PY" -c 'import sys; print("%d.%d.%d" % tuple(sys.version_info[:3])); sys.exit(sys.version_info < (3, 11))' \
    2>&1)
case $? in
0) ;;
1) case "$pyver" in [0-9]*.*) report wrong-python "$PY is Python $pyver; conveyor needs 3.11 or newer";; esac
   report wrong-python "$PY does not run: $(printf '%s' "$pyver" | tail -n 1)";;
*) report wrong-python "$PY does not run: $(printf '%s' "$pyver" | tail -n 1)";;
esac
pyver=$(printf '%s' "$pyver" | tail -n 1)
cvver=$(cd "$WORKDIR" && "$PY" -c 'import conveyor.cli, conveyor; print(conveyor.__version__)' 2>&1) \
    || report conveyor-missing "$PY (Python $pyver) cannot import conveyor: $(printf '%s' "$cvver" | tail -n 1)"
INFO="Python $pyver, conveyor $(printf '%s' "$cvver" | tail -n 1)"
"""

_PROBE_COMMAND = r"""
if ! command -v "$CV" >/dev/null 2>&1; then report conveyor-missing "$CV not found (PATH=$PATH)"; fi
out=$(cd "$WORKDIR" && "$CV" --help 2>&1)
case $? in
0) ;;
126|127) report wrong-python "$CV cannot start its Python: $(printf '%s' "$out" | tail -n 1)";;
*) report conveyor-missing "$CV does not run: $(printf '%s' "$out" | tail -n 1)";;
esac
INFO=""
"""

_UP = r"""
if pid=$(running_pid); then report already-running "$pid"; fi
[ -d "$WORKDIR" ] || report failed "no directory $WORKDIR"
mkdir -p "$STATE" 2>/dev/null || report failed "cannot create $STATE"
{PROBE}
rm -f "$PIDFILE"
[ -f "$LOG" ] && mv -f "$LOG" "$LOG.1"
cd "$WORKDIR" || report failed "cannot enter $WORKDIR"
if command -v setsid >/dev/null 2>&1; then detach=setsid; else detach=""; fi
nohup $detach sh -c 'echo $$ > "$0"; exec "$@"' "$PIDFILE" {COMMAND} </dev/null >>"$LOG" 2>&1 &
i=0
while [ $i -lt {WAIT_STEPS} ]; do
    nap; i=$((i + 1))
    pid=$(cat "$PIDFILE" 2>/dev/null) || continue
    case "$pid" in ''|*[!0-9]*) continue;; esac
    if ! alive "$pid"; then
        report failed "exited at once: $(tail -n 3 "$LOG" 2>/dev/null | tr '\n' ' ') (log: $LOG)"
    fi
    if grep -q -e "$READY" "$LOG" 2>/dev/null; then report started "$pid" "$INFO"; fi
done
pid=$(cat "$PIDFILE" 2>/dev/null) || report failed "no pid file $PIDFILE (log: $LOG)"
report started "$pid" "$INFO"
"""

_STATUS = r"""
if pid=$(running_pid); then
    since=$(date -r "$PIDFILE" '+%Y-%m-%d %H:%M:%S' 2>/dev/null || echo '?')
    report running "$pid" "since $since, log $LOG"
fi
if [ -f "$PIDFILE" ]; then
    report not-running "exited (stale pid file); last log lines: $(tail -n 2 "$LOG" 2>/dev/null | tr '\n' ' ')"
fi
report not-running
"""

_DOWN = r"""
pid=$(running_pid) || { rm -f "$PIDFILE"; report not-running; }
start=$(date +%s)
kill -TERM "$pid" 2>/dev/null
i=0
while alive "$pid" && [ $i -lt {STOP_STEPS} ]; do nap; i=$((i + 1)); done
took=$(( $(date +%s) - start ))
if alive "$pid"; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    rm -f "$PIDFILE"
    report killed "$pid" "$took"
fi
rm -f "$PIDFILE"
report stopped "$pid" "$took"
"""


def script(process: Process, action: str) -> str:
    """The sh script that does `action` (up, status or down) for `process` on its host."""
    stem = process.file_stem
    if process.kind == "worker":
        mark1, mark2, ready = "conveyor worker ", f"--name {process.name} ", "connecting to"
    else:
        mark1, mark2, ready = "conveyor dispatcher ", f"--bind {process.args[2]} ", "^tcp://"
    lines = [
        f"STATE={sh_word(process.state_dir)}",
        f"WORKDIR={sh_word(process.workdir)}",
        f'PIDFILE="$STATE"/{shlex.quote(stem + ".pid")}',
        f'LOG="$STATE"/{shlex.quote(stem + ".log")}',
        f"MARK1={shlex.quote(mark1)}",
        f"MARK2={shlex.quote(mark2)}",
        f"READY={shlex.quote(ready)}",
        f"PY={sh_word(process.python or '')}",
        f"CV={sh_word(process.conveyor or 'conveyor')}",
        "INFO=''",
        _PREAMBLE,
    ]
    if action == "up":
        if process.python:
            probe, base = _PROBE_PYTHON, ['"$PY"', "-m", "conveyor"]
        else:
            probe, base = _PROBE_COMMAND, ['"$CV"']
        env = ["env", *(shlex.quote(f"{k}={v}") for k, v in process.env.items())] if process.env else []
        command = " ".join([*env, *base, *(sh_word(a) for a in process.args)])
        body = (_UP.replace("{PROBE}", probe).replace("{COMMAND}", command)
                .replace("{WAIT_STEPS}", "50"))
    elif action == "status":
        body = _STATUS
    elif action == "down":
        body = _DOWN.replace("{STOP_STEPS}", str(int(process.stop_timeout * 5)))
    else:  # pragma: no cover - the commands below only pass these three
        raise ValueError(action)
    return "\n".join([*lines, body])


# --- running them ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    where: str
    state: str  # started, already-running, running, not-running, stopped, killed, unreachable, ...
    pid: int | None = None
    detail: str = ""
    seen: dict[str, Any] | None = None  # the dispatcher's view of this worker (status)

    def line(self, width: int, where_width: int) -> str:
        """NAME  WHERE  STATE (pid N): DETAIL"""
        text = self.state.replace("-", " ").replace("wrong python", "wrong Python")
        if self.pid is not None:
            text += f" (pid {self.pid})"
        if self.detail:
            text += f": {self.detail}"
        return f"{self.name:<{width}}  {self.where:<{where_width}}  {text}"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "host": self.where, "state": self.state, "pid": self.pid, "detail": self.detail,
        }
        if self.seen is not None:
            out["dispatcher_view"] = self.seen
        return out


def run_script(process: Process, action: str, timeout: float) -> Outcome:
    where = process.target.label()
    cmd = process.target.command()
    try:
        proc = subprocess.run(cmd, input=script(process, action), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return Outcome(process.name, where, "unreachable", detail=f"no answer within {timeout:g} s")
    except FileNotFoundError:
        return Outcome(process.name, where, "failed", detail=f"{cmd[0]} not found")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK + " "):
            return _parse_report(process.name, where, line[len(MARK) + 1:])
    err = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    reason = err[-1] if err else f"exit code {proc.returncode}"
    if not process.target.is_local and proc.returncode == 255:
        return Outcome(process.name, where, "unreachable", detail=reason)
    return Outcome(process.name, where, "failed", detail=reason)


def _parse_report(name: str, where: str, text: str) -> Outcome:
    state, _, rest = text.partition(" ")
    if state in ("started", "already-running", "running", "stopped", "killed"):
        pid_text, _, detail = rest.partition(" ")
        pid = int(pid_text) if pid_text.isdigit() else None
        if state in ("stopped", "killed") and detail.strip().isdigit():
            seconds = int(detail)
            if state == "killed":
                detail = f"did not stop within {seconds} s"
            else:
                detail = f"drained in {seconds} s" if name != "dispatcher" else f"in {seconds} s"
        return Outcome(name, where, state, pid, detail.strip())
    return Outcome(name, where, state, detail=rest.strip())


def _each(processes: list[Process], job: Callable[[Process], Outcome], show: Callable[[Outcome], None]
          ) -> list[Outcome]:
    """Run job on every process in parallel; show each outcome in inventory order as soon as it can be."""
    if not processes:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(processes))) as pool:
        futures = [pool.submit(job, p) for p in processes]
        outcomes = []
        for fut in futures:
            outcome = fut.result()
            show(outcome)
            outcomes.append(outcome)
    return outcomes


def _dispatcher_status(address: str, keys: str | None, timeout: float = 5.0) -> tuple[dict[str, Any] | None, str]:
    from conveyor.client import Client

    try:
        with Client(address, connect_timeout=timeout, reconnect_timeout=timeout, keys=keys) as client:
            return client.status(timeout=timeout), ""
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


# --- the commands ----------------------------------------------------------------------------------

InventoryArg = Annotated[Path, typer.Argument(help="The inventory file (see deploy/hosts.example.toml).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of lines.")]
KeysOpt = Annotated[
    str | None,
    typer.Option("--keys", envvar="CONVEYOR_KEYS", show_envvar=False,
                 help="Client key directory for asking the dispatcher (`conveyor keys`) [env CONVEYOR_KEYS]."),
]
HostOpt = Annotated[
    list[str] | None, typer.Option("--host", "-H", help="Only the host entry with this name (repeatable).")
]


class _Printer:
    def __init__(self, inventory: Inventory, as_json: bool):
        self.as_json = as_json
        processes = [inventory.dispatcher, *inventory.workers]
        self.width = max(len(p.name) for p in processes)
        self.where_width = max(len(p.target.label()) for p in processes)

    def __call__(self, outcome: Outcome) -> None:
        if not self.as_json:
            print(outcome.line(self.width, self.where_width), flush=True)

    def note(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)


def _load(path: Path, only: list[str] | None) -> Inventory:
    try:
        inventory = load_inventory(path)
    except InventoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    if only:
        unknown = sorted(set(only) - {w.name for w in inventory.workers})
        if unknown:
            print(f"error: no worker host named {', '.join(unknown)} in {path}", file=sys.stderr)
            raise typer.Exit(2)
        inventory.workers = [w for w in inventory.workers if w.name in only]
    if shutil.which("ssh") is None and any(not w.target.is_local for w in [inventory.dispatcher, *inventory.workers]):
        print("error: the `ssh` client is not installed (apt-get install openssh-client)", file=sys.stderr)
        raise typer.Exit(2)
    return inventory


@app.command()
def up(
    inventory_file: InventoryArg,
    host: HostOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the dispatcher sees every started worker.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: seconds to wait.")] = 60.0,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start the dispatcher, then a worker on every host; leave whatever already runs alone."""
    inventory = _load(inventory_file, host)
    show = _Printer(inventory, as_json)
    outcomes: list[Outcome] = []
    d = inventory.dispatcher
    if not host:
        first = run_script(d, "up", d.target.connect_timeout + 60)
        if first.state in ("started", "already-running"):
            first.detail = f"{inventory.address}" + (f"; {first.detail}" if first.detail else "")
        show(first)
        outcomes.append(first)

    def start(worker: Process) -> Outcome:
        outcome = run_script(worker, "up", worker.target.connect_timeout + 60)
        if outcome.state == "started":
            what = worker.mode + (f" x{worker.concurrency}" if worker.concurrency else "")
            what += f", tags {','.join(worker.tags)}" if worker.tags else ""
            outcome.detail = what + (f", {outcome.detail}" if outcome.detail else "")
        return outcome

    outcomes += _each(inventory.workers, start, show)
    code = 0 if all(o.state in ("started", "already-running") for o in outcomes) else 1
    result: dict[str, Any] = {"dispatcher": inventory.address, "hosts": [o.as_json() for o in outcomes]}
    names = [o.name for o in outcomes if o.name != "dispatcher" and o.state in ("started", "already-running")]
    if wait and names:
        missing = _wait_registered(inventory.address, names, timeout, keys)
        result["registered"] = sorted(set(names) - set(missing))
        if missing:
            show.note(f"not registered with the dispatcher after {timeout:g} s: {', '.join(missing)} "
                      f"(see their logs under {DEFAULT_STATE_DIR} or the state_dir you set)")
            code = 1
        else:
            show.note(f"all {len(names)} worker(s) registered with the dispatcher at {inventory.address}")
    if as_json:
        print(json.dumps(result))
    raise typer.Exit(code)


def _wait_registered(address: str, names: list[str], timeout: float, keys: str | None) -> list[str]:
    deadline = time.monotonic() + timeout
    missing = list(names)
    while True:
        status, _ = _dispatcher_status(address, keys, timeout=min(5.0, max(1.0, deadline - time.monotonic())))
        if status is not None:
            seen = {w["name"] for w in status["workers"]}
            missing = [n for n in names if n not in seen]
            if not missing:
                return []
        if time.monotonic() >= deadline:
            return missing
        time.sleep(0.25)


@app.command()
def status(
    inventory_file: InventoryArg,
    host: HostOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show each host's worker (running or not) and what the dispatcher sees; exit 1 unless all run."""
    inventory = _load(inventory_file, host)
    show = _Printer(inventory, as_json)
    d = inventory.dispatcher
    first = None if host else run_script(d, "status", d.target.connect_timeout + 20)
    if first is not None and first.state == "not-running":
        view, problem = None, "not running"
    else:  # running, or its host cannot be asked: ask the dispatcher itself
        view, problem = _dispatcher_status(inventory.address, keys)
    seen = {w["name"]: w for w in view["workers"]} if view is not None else {}
    outcomes: list[Outcome] = []
    if first is not None:
        if view is not None:
            first.detail = (f"{inventory.address}: {len(view['workers'])} worker(s), {view['queued']} queued, "
                            f"{view['running']} running, {view['totals'].get('succeeded', 0)} succeeded, "
                            f"{view['totals'].get('failed', 0)} failed")
        elif first.state != "not-running":
            first.detail = f"{inventory.address} does not answer from here ({problem})"
        show(first)
        outcomes.append(first)

    def check(worker: Process) -> Outcome:
        outcome = run_script(worker, "status", worker.target.connect_timeout + 20)
        w = seen.get(worker.name)
        if w is not None:
            outcome.seen = {k: w.get(k) for k in ("host", "pid", "mode", "concurrency", "running", "done", "tags",
                                                   "draining")}
            busy = f"{w['running']}/{w['concurrency']} busy, {w['done']} done" + (", draining" if w["draining"] else "")
            outcome.detail = f"registered from {w['host']} ({w['mode']}, {busy})"
        elif view is not None and outcome.state == "running":
            outcome.detail = "running but not registered with the dispatcher (see its log)"
        return outcome

    outcomes += _each(inventory.workers, check, show)
    known = {w.name for w in inventory.workers}
    others = [w for name, w in seen.items() if name not in known]
    if others and not host:
        show.note("also registered: " + ", ".join(f"{w['name']} ({w['host']})" for w in others))
    if as_json:
        print(json.dumps({
            "dispatcher": {"address": inventory.address, "status": view, "problem": problem or None},
            "hosts": [o.as_json() for o in outcomes],
        }))
    ok = all(o.state == "running" for o in outcomes) and view is not None
    raise typer.Exit(0 if ok else 1)


@app.command()
def down(
    inventory_file: InventoryArg,
    host: HostOpt = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds a worker may drain before it is killed [its drain_timeout + 10].")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop the workers (SIGTERM: they finish their tasks and exit; killed after a timeout), then the dispatcher."""
    inventory = _load(inventory_file, host)
    show = _Printer(inventory, as_json)
    if timeout is not None:
        for p in [inventory.dispatcher, *inventory.workers]:
            p.stop_timeout = timeout
    outcomes = _each(inventory.workers, lambda w: run_script(w, "down", w.target.connect_timeout + w.stop_timeout + 30),
                     show)
    if not host:
        d = inventory.dispatcher
        last = run_script(d, "down", d.target.connect_timeout + d.stop_timeout + 30)
        show(last)
        outcomes.append(last)
    if as_json:
        print(json.dumps({"dispatcher": inventory.address, "hosts": [o.as_json() for o in outcomes]}))
    raise typer.Exit(0 if all(o.state in ("stopped", "killed", "not-running") for o in outcomes) else 1)
