"""How fast and how lean a cluster comes up (issue 19): start-up to the first result, idle RSS, imports per role.

    python -m benchmarks.startup              # 3 runs of each case, medians
    python -m benchmarks.startup --runs 5

Every case runs in fresh interpreters; the machine is shared, so CPU seconds (user + system, summed over
every process of the cluster) are reported beside wall seconds: they do not grow when other work
competes for the cores. Results go to benchmarks/results/startup-<UTC>.json.

- client: `Client()` with no address (a private local cluster: a dispatcher and one processes worker with
  2 children), to the first `submit(...).result()`. Then, idle, the RSS and PSS of every process of it.
- up: `conveyor up --workers 2` (journal on, in a temporary state directory) to its "conveyor is up"
  line, and to a client's first result.
- imports: `python -X importtime -m conveyor ROLE --help` and the real start of each role (a dispatcher
  to its endpoint line, a worker to its registration), from the command line and as a local cluster
  starts it (conveyor/cli/spawn.py): import seconds, modules loaded (sys.modules at exit), and which of
  the modules a role should not need were among them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
# Modules a role may load only when it uses them: their presence in a role's import list is reported.
WATCHED = ("rich", "typer.rich_utils", "prometheus_client", "matplotlib", "sqlite3", "conveyor.client",
           "conveyor.dispatcher", "conveyor.worker", "conveyor.cli.observe", "conveyor.cli.cluster",
           "conveyor.cli.jobs", "conveyor.cli.keys", "numpy", "psutil", "cloudpickle", "asyncio")
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")

_CLIENT_CASE = """
import json, sys, time
import psutil
t0 = time.perf_counter()
c0 = time.process_time()
from conveyor import Client
client = Client(local_concurrency=2)
t_ready = time.perf_counter() - t0
client.submit("operator:add", 1, 2).result()
t_first = time.perf_counter() - t0
me = psutil.Process()
procs = [me, *me.children(recursive=True)]
cpu = time.process_time() - c0
for p in procs[1:]:
    t = p.cpu_times()
    cpu += t.user + t.system
time.sleep(1.0)  # idle: let the first task's transients settle
mem = []
for p in procs[1:]:
    info = p.memory_full_info()
    mem.append({"name": " ".join(p.cmdline()[2:5]) or p.name(), "rss_mib": info.rss / 2**20,
                "pss_mib": info.pss / 2**20, "uss_mib": info.uss / 2**20})
client.close()
print(json.dumps({"ready_s": t_ready, "first_result_s": t_first, "cpu_s": cpu, "processes": mem}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _tree_cpu_s(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def case_client() -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _CLIENT_CASE], env=_env(), capture_output=True, text=True,
                         timeout=120, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["rss_total_mib"] = sum(p["rss_mib"] for p in result["processes"])
    result["pss_total_mib"] = sum(p["pss_mib"] for p in result["processes"])
    return result


def case_up(workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as state:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "up", "--workers", str(workers), "--bind", "tcp://127.0.0.1:0",
             "--log-level", "warning"],
            env=_env(XDG_STATE_HOME=state), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert proc.stderr is not None
            address = None
            for line in proc.stderr:
                if line.startswith("conveyor is up"):
                    address = line.split("dispatcher at ")[1].split(",")[0]
                    break
            if address is None:
                raise RuntimeError(f"conveyor up exited {proc.wait()}")
            t_up = time.perf_counter() - t0
            from conveyor import Client

            with Client(address) as client:
                client.submit("operator:add", 1, 2).result()
                t_first = time.perf_counter() - t0
            cpu = _tree_cpu_s(psutil.Process(proc.pid))
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"up_s": t_up, "first_result_s": t_first, "cpu_s": cpu}


# Runs a module as `python -m` would, and at exit writes the names of every module loaded to a file:
# -X importtime alone misses the modules loaded through importlib.import_module (the lazy tables do that).
_WRAP = (
    "import atexit, os, runpy, sys\n"
    "atexit.register(lambda: open(os.environ['STARTUP_MODULES'], 'w').write('\\n'.join(sys.modules)))\n"
    "module = sys.argv.pop(1)\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def _imports(stderr: str, modules_file: Path) -> dict[str, Any]:
    total_us = 0
    for line in stderr.splitlines():
        m = IMPORT_LINE.match(line)
        if m and len(m.group(3)) == 1:  # a top-level import: its cumulative time includes its children
            total_us += int(m.group(2))
    loaded = set(modules_file.read_text().split())
    watched = [w for w in WATCHED if w in loaded]
    return {"import_s": total_us / 1e6, "modules": len(loaded), "watched": watched}


def _role(module: str, args: list[str], ready: str | None, timeout_s: float = 60.0) -> dict[str, Any]:
    """`python -m module args` under -X importtime. With `ready`, stopped (SIGTERM, as a user would) once
    its stdout has a line starting so, or (ready == "") at once after the callback below is true."""
    with tempfile.TemporaryDirectory() as tmp:
        modules_file = Path(tmp) / "modules"
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-c", _WRAP, module, *args],
                                env=_env(STARTUP_MODULES=str(modules_file)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        cpu = None
        if ready is not None:
            deadline = time.monotonic() + timeout_s
            for line in proc.stdout:
                if line.startswith(ready) or time.monotonic() > deadline:
                    break
            cpu = _tree_cpu_s(psutil.Process(proc.pid))
            proc.terminate()
        _, err = proc.communicate(timeout=timeout_s)
        out = _imports(err, modules_file)
    return out if cpu is None else {**out, "cpu_s": cpu}


def case_imports() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role in ("--help", "dispatcher --help", "worker --help"):
        out[f"conveyor {role}"] = _role("conveyor", role.split(), None)
    quiet = ["--log-level", "warning"]
    out["conveyor dispatcher (run)"] = _role(
        "conveyor", ["dispatcher", "--bind", "tcp://127.0.0.1:0", "--no-journal", *quiet], "tcp://")
    spawn = (ROOT / "conveyor" / "cli" / "spawn.py").exists()  # not before issue 19: the command line only
    options = json.dumps({"bind": "tcp://127.0.0.1:0", "no_journal": True, "log_level": "warning"})
    if spawn:
        out["local cluster's dispatcher"] = _role("conveyor.cli.spawn", ["dispatcher", options], "tcp://")
    # A worker runs until stopped: a dispatcher to register with; the worker is stopped once it has.
    disp = subprocess.Popen([sys.executable, "-m", "conveyor", "dispatcher", "--bind", "tcp://127.0.0.1:0",
                             "--no-journal", *quiet], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert disp.stdout is not None
        address = disp.stdout.readline().strip()
        from conveyor import Client

        with Client(address) as client:
            for name, module, args in (
                ("conveyor worker (run)", "conveyor", ["worker", "--connect", address, "-n", "2", *quiet]),
                ("local cluster's worker", "conveyor.cli.spawn",
                 ["worker", json.dumps({"connect": address, "concurrency": 2, "log_level": "warning"})]),
            ):
                if spawn or module == "conveyor":
                    out[name] = _worker_role(client, module, args)
    finally:
        disp.terminate()
        disp.wait(30)
    return out


def _worker_role(client: Any, module: str, args: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        modules_file = Path(tmp) / "modules"
        before = len(client.status()["workers"])
        worker = subprocess.Popen([sys.executable, "-X", "importtime", "-c", _WRAP, module, *args],
                                  env=_env(STARTUP_MODULES=str(modules_file)), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        client.wait_for_workers(before + 1, timeout=60)
        cpu = _tree_cpu_s(psutil.Process(worker.pid))
        worker.terminate()
        _, err = worker.communicate(timeout=30)
        # A worker's stderr also holds its fork server's imports (the flag is passed on): counted too.
        return {**_imports(err, modules_file), "cpu_s": cpu}


def bare_interpreter_mib() -> float:
    """The RSS of `python -c pass` here: the floor of every process (site hooks of this machine included)."""
    out = subprocess.run([sys.executable, "-c", "print(open('/proc/self/status').read())"], env=_env(),
                         capture_output=True, text=True, check=True).stdout
    kib = next(int(line.split()[1]) for line in out.splitlines() if line.startswith("VmRSS:"))
    return kib / 1024


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each case (medians are reported)")
    args = parser.parse_args(argv)
    client_runs = [case_client() for _ in range(args.runs)]
    up_runs = [case_up(2) for _ in range(args.runs)]
    imports = [case_imports() for _ in range(args.runs)]
    summary: dict[str, Any] = {
        "client_first_result_s": _median(client_runs, "first_result_s"),
        "client_ready_s": _median(client_runs, "ready_s"),
        "client_cpu_s": _median(client_runs, "cpu_s"),
        "idle_rss_total_mib": _median(client_runs, "rss_total_mib"),
        "idle_pss_total_mib": _median(client_runs, "pss_total_mib"),
        "up_ready_s": _median(up_runs, "up_s"),
        "up_first_result_s": _median(up_runs, "first_result_s"),
        "up_cpu_s": _median(up_runs, "cpu_s"),
        "bare_interpreter_rss_mib": bare_interpreter_mib(),
        "imports": {role: {"import_s": statistics.median(r[role]["import_s"] for r in imports),
                           "modules": imports[0][role]["modules"], "watched": imports[0][role]["watched"],
                           **({"cpu_s": statistics.median(r[role]["cpu_s"] for r in imports)}
                              if "cpu_s" in imports[0][role] else {})}
                    for role in imports[0]},
    }
    print(f"{'case':<34}{'wall s':>9}{'CPU s':>9}")
    print(f"{'Client() to first result':<34}{summary['client_first_result_s']:>9.3f}{summary['client_cpu_s']:>9.3f}")
    print(f"{'conveyor up --workers 2 to ready':<34}{summary['up_ready_s']:>9.3f}{'':>9}")
    print(f"{'  ... to first result':<34}{summary['up_first_result_s']:>9.3f}{summary['up_cpu_s']:>9.3f}")
    print(f"\nidle, Client() cluster: RSS {summary['idle_rss_total_mib']:.1f} MiB, "
          f"PSS {summary['idle_pss_total_mib']:.1f} MiB in all; a bare `python -c pass` here: "
          f"{summary['bare_interpreter_rss_mib']:.1f} MiB RSS")
    for p in client_runs[-1]["processes"]:
        print(f"  {p['name'][:40]:<42}RSS {p['rss_mib']:6.1f}  PSS {p['pss_mib']:6.1f}  USS {p['uss_mib']:6.1f} MiB")
    print(f"\n{'imports':<34}{'import s':>9}{'CPU s':>9}{'modules':>9}  loaded, watched")
    for role, r in summary["imports"].items():
        cpu = f"{r['cpu_s']:>9.3f}" if "cpu_s" in r else f"{'':>9}"
        print(f"{role:<34}{r['import_s']:>9.3f}{cpu}{r['modules']:>9}  {', '.join(r['watched'])}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"startup-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({"summary": summary, "client": client_runs, "up": up_runs, "imports": imports},
                               indent=1))
    print(f"\n-> {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
