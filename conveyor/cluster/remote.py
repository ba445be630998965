"""What runs on each host, and what it came to: the `sh` scripts behind up, status and down.

A process (a worker, a dispatcher or the witness) is started detached (setsid + nohup) so it outlives the SSH
session, with a pid file and a log file in its host's state directory. `up` finds a running process
by its pid file and command line and leaves it alone, so running it twice starts nothing twice;
`down` sends SIGTERM (a worker drains, then exits), waits up to the stop timeout, then kills.
Each script ends with one report line (ssh.MARK STATE [PID] [DETAILS]), which run() turns into an
Outcome.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Literal

from conveyor.cluster.inventory import Process
from conveyor.cluster.ssh import MARK

Action = Literal["up", "status", "down"]


@dataclass
class Outcome:
    """What an action came to for one process, as one line (or one JSON object) of output."""

    name: str
    where: str
    state: str  # started, already-running, running, not-running, stopped, killed, unreachable, ...
    pid: int | None = None
    detail: str = ""
    seen: dict[str, Any] | None = None  # the dispatcher's view of this worker (status)
    pair: dict[str, Any] | None = None  # a dispatcher of a standby pair: its own answer (status)

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
        if self.pair is not None:
            out["pair"] = self.pair
        return out


def run(process: Process, action: Action) -> Outcome:
    """Do `action` for `process` on its host, allowing for the connection, the start or the stop."""
    target = process.target
    if action == "up":
        timeout = target.connect_timeout + 60
    elif action == "status":
        timeout = target.connect_timeout + 20
    else:
        timeout = target.connect_timeout + process.stop_timeout + 30
    state, rest = target.run(script(process, action), timeout)
    return _outcome(process.name, target.label(), state, rest, drains=process.kind == "worker")


def _outcome(name: str, where: str, state: str, rest: str, drains: bool = True) -> Outcome:
    """The Outcome of a report: STATE, then for these states a pid, then details (`drains`: a worker's)."""
    if state in ("started", "already-running", "running", "stopped", "killed"):
        pid_text, _, detail = rest.partition(" ")
        pid = int(pid_text) if pid_text.isdigit() else None
        if state in ("stopped", "killed") and detail.strip().isdigit():
            seconds = int(detail)
            if state == "killed":
                detail = f"did not stop within {seconds} s"
            else:
                detail = f"drained in {seconds} s" if drains else f"in {seconds} s"
        return Outcome(name, where, state, pid, detail.strip())
    return Outcome(name, where, state, detail=rest.strip())


def script(process: Process, action: Action) -> str:
    """The sh script that does `action` (up, status or down) for `process` on its host."""
    stem = process.file_stem
    if process.kind == "worker":
        mark1, mark2, ready = "conveyor worker ", f"--name {process.name} ", "connecting to"
    else:  # a dispatcher or the witness: `conveyor dispatcher|witness --bind ADDRESS ...`; it prints ADDRESS
        mark1, mark2, ready = f"conveyor {process.args[0]} ", f"--bind {process.args[2]} ", "^tcp://"
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
        _PREAMBLE.replace("{MARK}", MARK),
    ]
    if action == "up":
        if process.python:
            probe, base = _PROBE_PYTHON, ['"$PY"', "-m", "conveyor"]
        else:
            probe, base = _PROBE_COMMAND, ['"$CV"']
        env = ["env", *(shlex.quote(f"{k}={v}") for k, v in process.env.items())] if process.env else []
        command = " ".join([*env, *base, *(sh_word(a) for a in process.args)])
        body = _UP.replace("{PROBE}", probe).replace("{COMMAND}", command).replace("{WAIT_STEPS}", "50")
    elif action == "status":
        body = _STATUS
    elif action == "down":
        body = _DOWN.replace("{STOP_STEPS}", str(int(process.stop_timeout * 5)))
    else:  # pragma: no cover - the commands only pass these three
        raise ValueError(action)
    return "\n".join([*lines, body])


def sh_word(word: str) -> str:
    """Quote a word for sh, letting a leading ~/ mean the remote user's home."""
    if word == "~":
        return '"$HOME"'
    if word.startswith("~/"):
        return '"$HOME"/' + shlex.quote(word[2:])
    return shlex.quote(word)


# --- the scripts: a preamble of helpers, a probe of how conveyor runs there, then the action ---------

_PREAMBLE = r"""
set -u
report() { printf '%s %s\n' "{MARK}" "$*"; exit 0; }
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

