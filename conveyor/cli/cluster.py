"""The `conveyor cluster` sub-app: up, status and down, with one line per host.

Each command reads the inventory, then runs its action on the dispatcher's host and on every worker's
host (workers in parallel, printed in inventory order as each answers). A line says started / already
running / unreachable / conveyor missing / wrong Python / failed, and for `status` running / not
running plus what the dispatcher sees. The exit code is 0 when every host came out as asked, else 1;
2 for a bad inventory or command line.

With a standby pair ([backup], optionally [witness]): `up` starts the witness, the primary, the
backup, then the workers (`--connect primary,backup`); `status` asks each dispatcher on its own
(conveyor/cluster/probe.py) and says which is active; `down` stops the workers, then both dispatchers
at once (so that neither takes over from the other on its way out), then the witness.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import typer

from conveyor.cli.common import keys_option, new_app
from conveyor.cluster import remote
from conveyor.cluster.inventory import DEFAULT_STATE_DIR, Inventory, Process, load_inventory
from conveyor.cluster.probe import Answer, ask
from conveyor.cluster.remote import Outcome
from conveyor.errors import InventoryError

app = new_app("cluster", "Run a dispatcher and workers on many hosts over SSH, from an inventory file (hosts.toml).")

InventoryArg = Annotated[Path, typer.Argument(help="The inventory file (see deploy/hosts.example.toml).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of lines.")]
KeysOpt = Annotated[
    str | None, keys_option("Client key directory for asking the dispatcher (`conveyor keys`) [env CONVEYOR_KEYS].")
]
HostOpt = Annotated[
    list[str] | None, typer.Option("--host", "-H", help="Only the host entry with this name (repeatable).")
]


@app.command()
def up(
    inventory_file: InventoryArg,
    host: HostOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the dispatcher sees every started worker.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: seconds to wait.")] = 60.0,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start the dispatcher (a pair: witness, primary, backup), then a worker per host; leave what runs alone."""
    inventory = _load(inventory_file, host)
    report = _Report(inventory, as_json)
    if not host:
        for service in inventory.services:  # one after the other: each is listening before the next starts
            first = remote.run(service, "up")
            if first.state in ("started", "already-running"):
                first.detail = _label(service) + (f"; {first.detail}" if first.detail else "")
            report.add(first)

    def start(worker: Process) -> Outcome:
        outcome = remote.run(worker, "up")
        if outcome.state == "started":
            what = worker.mode + (f" x{worker.concurrency}" if worker.concurrency else "")
            what += f", tags {','.join(worker.tags)}" if worker.tags else ""
            outcome.detail = what + (f", {outcome.detail}" if outcome.detail else "")
        return outcome

    report.each(inventory.workers, start)
    outcomes = report.outcomes
    code = 0 if all(o.state in ("started", "already-running") for o in outcomes) else 1
    result: dict[str, Any] = {"dispatcher": inventory.address, **_pair_json(inventory), "hosts": report.hosts_json()}
    workers = {w.name for w in inventory.workers}
    names = [o.name for o in outcomes if o.name in workers and o.state in ("started", "already-running")]
    if wait and names:
        missing = _wait_registered(inventory.addresses, names, timeout, keys)
        result["registered"] = sorted(set(names) - set(missing))
        if missing:
            report.note(f"not registered with the dispatcher after {timeout:g} s: {', '.join(missing)} "
                        f"(see their logs under {DEFAULT_STATE_DIR} or the state_dir you set)")
            code = 1
        elif inventory.backup is None:
            report.note(f"all {len(names)} worker(s) registered with the dispatcher at {inventory.address}")
        else:
            report.note(f"all {len(names)} worker(s) registered with the active dispatcher of "
                        f"{', '.join(inventory.addresses)}")
    if as_json:
        print(json.dumps(result))
    raise typer.Exit(code)


@app.command()
def status(
    inventory_file: InventoryArg,
    host: HostOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show each host's worker and what the dispatcher sees (a pair: which is active); exit 1 unless all run."""
    inventory = _load(inventory_file, host)
    report = _Report(inventory, as_json)
    if inventory.backup is None:
        view, problem = _single_status(inventory, report, bool(host), keys)
        pair_ok = True
    else:
        view, problem, answers = _pair_status(inventory, report, bool(host), keys)
        pair_ok = sum(a.state == "active" for a in answers) == 1
    seen = {w["name"]: w for w in view["workers"]} if view is not None else {}

    def check(worker: Process) -> Outcome:
        outcome = remote.run(worker, "status")
        w = seen.get(worker.name)
        if w is not None:
            outcome.seen = {k: w.get(k) for k in ("host", "pid", "mode", "concurrency", "running", "done", "tags",
                                                   "draining")}
            busy = f"{w['running']}/{w['concurrency']} busy, {w['done']} done" + (", draining" if w["draining"] else "")
            outcome.detail = f"registered from {w['host']} ({w['mode']}, {busy})"
        elif view is not None and outcome.state == "running":
            outcome.detail = "running but not registered with the dispatcher (see its log)"
        return outcome

    report.each(inventory.workers, check)
    known = {w.name for w in inventory.workers}
    others = [w for name, w in seen.items() if name not in known]
    if others and not host:
        report.note("also registered: " + ", ".join(f"{w['name']} ({w['host']})" for w in others))
    if as_json:
        out: dict[str, Any] = {"dispatcher": {"address": inventory.address, "status": view, "problem": problem or None}}
        if inventory.backup is not None:
            out["pair"] = {**_pair_json(inventory), "dispatchers": [a.as_json() for a in answers]}
        print(json.dumps({**out, "hosts": report.hosts_json()}))
    ok = all(o.state == "running" for o in report.outcomes) and view is not None and pair_ok
    raise typer.Exit(0 if ok else 1)


def _single_status(
    inventory: Inventory, report: _Report, only_workers: bool, keys: str | None,
) -> tuple[dict[str, Any] | None, str]:
    """The dispatcher's line (unless only workers are asked about), and what it sees (or why not)."""
    first = None if only_workers else remote.run(inventory.dispatcher, "status")
    if first is not None and first.state == "not-running":
        view, problem = None, "not running"
    else:  # running, or its host cannot be asked: ask the dispatcher itself
        view, problem = _dispatcher_status(inventory.address, keys)
    if first is not None:
        if view is not None:
            first.detail = f"{inventory.address}: {_view_summary(view)}"
        elif first.state != "not-running":
            first.detail = f"{inventory.address} does not answer from here ({problem})"
        report.add(first)
    return view, problem


def _pair_status(
    inventory: Inventory, report: _Report, only_workers: bool, keys: str | None,
) -> tuple[dict[str, Any] | None, str, list[Answer]]:
    """The witness's and both dispatchers' lines (each dispatcher asked on its own: active or passive),
    and what the active one sees (or why there is no single active one)."""
    answers: dict[str, Answer] = {}

    def check(service: Process) -> Outcome:
        outcome = remote.run(service, "status")
        if outcome.state == "not-running":
            answers[service.name] = Answer(service.address, None, problem="not running")
            return outcome
        if service.kind == "witness":
            if outcome.state == "running":
                outcome.detail = service.address + (f"; {outcome.detail}" if outcome.detail else "")
            return outcome
        answer = answers[service.name] = ask(service.address, keys)
        outcome.detail = f"{_label(service)}: {answer.summary()}"
        if answer.status is not None:
            outcome.detail += f"; {_view_summary(answer.status)}"
        outcome.pair = answer.as_json()
        return outcome

    if only_workers:
        with ThreadPoolExecutor(max_workers=2) as pool:
            for d, answer in zip(inventory.dispatchers, pool.map(lambda d: ask(d.address, keys), inventory.dispatchers),
                                 strict=True):
                answers[d.name] = answer
    else:
        report.each(inventory.services, check)
    pair = [answers[d.name] for d in inventory.dispatchers]
    active = sorted((a for a in pair if a.state == "active"), key=lambda a: a.epoch)
    if len(active) > 1:
        report.note(f"both dispatchers are active ({', '.join(f'{a.address} in epoch {a.epoch}' for a in active)}): "
                    "the one of the lower epoch steps down once it hears of the higher")
    if active:
        return active[-1].status, "", pair
    why = "; ".join(f"{a.address}: {a.summary()}" for a in pair)
    return None, f"no dispatcher of the pair is active ({why})", pair


@app.command()
def down(
    inventory_file: InventoryArg,
    host: HostOpt = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds a worker may drain before it is killed [its drain_timeout + 10].")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop the workers (SIGTERM: they drain; killed after a timeout), then the dispatcher(s) and the witness."""
    inventory = _load(inventory_file, host)
    report = _Report(inventory, as_json)
    if timeout is not None:
        for p in inventory.processes:
            p.stop_timeout = timeout
    report.each(inventory.workers, lambda w: remote.run(w, "down"))
    if not host:
        report.each(inventory.dispatchers, lambda d: remote.run(d, "down"))
        if inventory.witness is not None:  # last: an active dispatcher may need its lease until it stops
            report.add(remote.run(inventory.witness, "down"))
    if as_json:
        print(json.dumps({"dispatcher": inventory.address, **_pair_json(inventory), "hosts": report.hosts_json()}))
    raise typer.Exit(0 if all(o.state in ("stopped", "killed", "not-running") for o in report.outcomes) else 1)


# --- shared by the commands --------------------------------------------------------------------------


def _load(path: Path, only: list[str] | None) -> Inventory:
    """The inventory (only the worker hosts named `only`, if given); exit 2 with one line saying why not."""
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
    if shutil.which("ssh") is None and any(not p.target.is_local for p in inventory.processes):
        print("error: the `ssh` client is not installed (apt-get install openssh-client)", file=sys.stderr)
        raise typer.Exit(2)
    return inventory


class _Report:
    """The outcomes of a command, in order; each printed as a line as soon as it is known (unless --json)."""

    def __init__(self, inventory: Inventory, as_json: bool):
        self.as_json = as_json
        self.outcomes: list[Outcome] = []
        self.width = max(len(p.name) for p in inventory.processes)
        self.where_width = max(len(p.target.label()) for p in inventory.processes)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.note(outcome.line(self.width, self.where_width))

    def each(self, processes: list[Process], job: Callable[[Process], Outcome]) -> None:
        """Run job on every process in parallel; add each outcome in inventory order as soon as it can be."""
        if not processes:
            return
        with ThreadPoolExecutor(max_workers=min(32, len(processes))) as pool:
            for future in [pool.submit(job, p) for p in processes]:
                self.add(future.result())

    def note(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)

    def hosts_json(self) -> list[dict[str, Any]]:
        return [o.as_json() for o in self.outcomes]


def _label(service: Process) -> str:
    """A dispatcher's or the witness's address, and a pair's dispatcher's role: 'tcp://10.0.0.5:5555 (primary)'."""
    return service.address + (f" ({service.role})" if service.role else "")


def _view_summary(view: dict[str, Any]) -> str:
    """'2 worker(s), 0 queued, 0 running, 5 succeeded, 0 failed'"""
    return (f"{len(view['workers'])} worker(s), {view['queued']} queued, {view['running']} running, "
            f"{view['totals'].get('succeeded', 0)} succeeded, {view['totals'].get('failed', 0)} failed")


def _pair_json(inventory: Inventory) -> dict[str, Any]:
    """The backup's and the witness's addresses, for a pair's JSON output."""
    if inventory.backup is None:
        return {}
    return {"backup": inventory.backup.address,
            "witness": inventory.witness.address if inventory.witness is not None else None}


def _dispatcher_status(
    address: str | list[str], keys: str | None, timeout: float = 5.0,
) -> tuple[dict[str, Any] | None, str]:
    """The dispatcher's status (of a pair: the active one's, followed by the Client), or None and why not."""
    from conveyor.client import Client

    try:
        with Client(address, connect_timeout=timeout, reconnect_timeout=timeout, keys=keys) as client:
            return client.status(timeout=timeout), ""
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _wait_registered(addresses: list[str], names: list[str], timeout: float, keys: str | None) -> list[str]:
    """Wait until the dispatcher at `addresses` (a pair: the active one) sees every worker in `names`; those it
    still does not see."""
    deadline = time.monotonic() + timeout
    missing = list(names)
    while True:
        status, _ = _dispatcher_status(addresses if len(addresses) > 1 else addresses[0], keys,
                                       timeout=min(5.0, max(1.0, deadline - time.monotonic())))
        if status is not None:
            seen = {w["name"] for w in status["workers"]}
            missing = [n for n in names if n not in seen]
            if not missing:
                return []
        if time.monotonic() >= deadline:
            return missing
        time.sleep(0.25)
