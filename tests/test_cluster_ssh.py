"""`conveyor cluster up|status|down` against real sshd servers in network-namespace hosts.

Host `admin` runs `conveyor cluster` (and so the local dispatcher); hosts b and c run Debian's sshd
with a host key and a client key made by the test (key-only login). The ssh client is told to ignore
~/.ssh/config (-F /dev/null) and to keep its known_hosts in the test's directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.conftest import ROOT, stop_process, wait_until
from tests.conftest_netns import require

PORT = 5555


@dataclass
class SshHosts:
    net: netns.Network
    tmp: Path
    key: Path

    def ssh_defaults(self, **extra: Any) -> dict[str, Any]:
        opts = ["-F", "/dev/null", "-o", f"UserKnownHostsFile={self.tmp / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=accept-new"]
        return {"user": "root", "identity_file": str(self.key), "ssh_options": opts, "connect_timeout": 5,
                "python": sys.executable, "workdir": str(ROOT), "drain_timeout": 5, **extra}

    def write_inventory(self, hosts: list[dict[str, Any]], dispatcher: dict[str, Any] | None = None,
                        **defaults: Any) -> Path:
        admin = self.net["admin"]
        disp = {"host": "local", "address": f"tcp://{admin.address}:{PORT}",
                "bind": f"tcp://{admin.address}:{PORT}", "journal": False, "insecure": True,
                "state_dir": str(self.tmp / "state-admin")}
        disp.update(dispatcher or {})
        lines = ["[defaults]", *_toml_items(self.ssh_defaults(**defaults)), "", "[dispatcher]", *_toml_items(disp)]
        for host in hosts:
            lines += ["", "[[hosts]]", *_toml_items(host)]
        path = self.tmp / "hosts.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def conveyor(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `conveyor ARGS` on the admin host."""
        return self.net["admin"].run([sys.executable, "-m", "conveyor", *args], cwd=ROOT, timeout=timeout)


def _toml_items(table: dict[str, Any]) -> list[str]:
    return [f"{key} = {json.dumps(value)}" for key, value in table.items()]  # JSON scalars/arrays are TOML


@pytest.fixture
def ssh_hosts(netns_network: Any, tmp_path: Path) -> SshHosts:
    require(None if netns.sshd_path() else "sshd not found: apt-get install openssh-server")
    require(None if subprocess.run(["which", "ssh"], capture_output=True).returncode == 0
            else "ssh not found: apt-get install openssh-client")
    net = netns_network(["admin", "b", "c", "nossh"])
    key = netns.ssh_keygen(tmp_path / "id_ed25519")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(Path(f"{key}.pub").read_text())
    for name in ("b", "c"):
        netns.start_sshd(net[name], tmp_path / f"sshd-{name}", authorized)
    return SshHosts(net, tmp_path, key)


def conveyor_procs(host: netns.Host, marker: str) -> list[int]:
    """Pids of processes in `host` whose command line contains `marker` (e.g. `--name b`)."""
    out = []
    for pid in host.pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "conveyor" in cmdline and marker in cmdline and "multiprocessing" not in cmdline:
            out.append(pid)
    return out


def by_name(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return {h["name"]: h for h in data["hosts"]}


def test_cluster_up_status_down(ssh_hosts: SshHosts) -> None:
    net = ssh_hosts.net
    admin, b, c = net["admin"], net["b"], net["c"]
    address = f"tcp://{admin.address}:{PORT}"
    inventory = ssh_hosts.write_inventory([
        {"name": "b", "address": b.address, "mode": "threads", "concurrency": 2, "tags": ["io"],
         "state_dir": str(ssh_hosts.tmp / "state-b")},
        {"name": "c", "address": c.address, "mode": "processes", "concurrency": 2,
         "state_dir": str(ssh_hosts.tmp / "state-c")},
    ])
    waiter: subprocess.Popen[str] | None = None
    finished = False
    try:
        first = ssh_hosts.conveyor("cluster", "up", str(inventory), "--wait", "--timeout", "30")
        assert first.returncode == 0, first.stdout + first.stderr
        lines = {ln.split()[0]: ln for ln in first.stdout.splitlines() if ln.strip()}
        assert "started (pid" in lines["dispatcher"] and address in lines["dispatcher"], first.stdout
        assert "started (pid" in lines["b"] and "threads x2, tags io" in lines["b"], first.stdout
        assert "started (pid" in lines["c"] and "processes x2" in lines["c"], first.stdout
        assert "Python 3." in lines["b"] and "conveyor " in lines["b"]
        assert "all 2 worker(s) registered" in first.stdout
        started_pids = {name: int(line.split("(pid ")[1].split(")")[0]) for name, line in lines.items()
                        if "(pid " in line}

        # the dispatcher sees each worker with its own host's address
        status = json.loads(ssh_hosts.conveyor("status", "--json", "--dispatcher", address).stdout)
        assert {w["name"]: w["host"] for w in status["workers"]} == {"b": b.address, "c": c.address}
        done = ssh_hosts.conveyor("submit", "--wait", "--dispatcher", address, "tests.tasks:add", "20", "22")
        assert (done.returncode, done.stdout.strip()) == (0, "42"), done.stderr

        # up again: nothing new starts
        again = ssh_hosts.conveyor("cluster", "up", str(inventory), "--json")
        assert again.returncode == 0, again.stdout + again.stderr
        after = by_name(again)
        assert {n: h["state"] for n, h in after.items()} == dict.fromkeys(("dispatcher", "b", "c"), "already-running")
        assert {n: h["pid"] for n, h in after.items()} == started_pids
        assert len(conveyor_procs(b, "--name b")) == 1 and len(conveyor_procs(c, "--name c")) == 1
        assert len(json.loads(ssh_hosts.conveyor("status", "--json", "-d", address).stdout)["workers"]) == 2

        # status: every host's worker and the dispatcher's view of it
        st = ssh_hosts.conveyor("cluster", "status", str(inventory))
        assert st.returncode == 0, st.stdout + st.stderr
        st_lines = {ln.split()[0]: ln for ln in st.stdout.splitlines() if ln.strip()}
        assert "running (pid" in st_lines["b"] and f"registered from {b.address} (threads" in st_lines["b"]
        assert "running (pid" in st_lines["c"] and f"registered from {c.address} (processes" in st_lines["c"]
        assert "2 worker(s)" in st_lines["dispatcher"]

        # down drains: a task running on b when `down` starts still finishes and reaches its client
        waiter = admin.popen(
            [sys.executable, "-m", "conveyor", "submit", "--wait", "--tag", "io", "--dispatcher", address,
             "tests.tasks:sleep", "1.5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        wait_until(lambda: any(w["running"] for w in json.loads(
            ssh_hosts.conveyor("status", "--json", "-d", address).stdout)["workers"]), 20, what="the task to start")
        down = ssh_hosts.conveyor("cluster", "down", str(inventory))
        assert down.returncode == 0, down.stdout + down.stderr
        down_lines = {ln.split()[0]: ln for ln in down.stdout.splitlines() if ln.strip()}
        assert all("stopped (pid" in down_lines[n] for n in ("b", "c", "dispatcher")), down.stdout
        out, err = waiter.communicate(timeout=30)
        assert (waiter.returncode, out.strip()) == (0, "1.5"), err
        assert not conveyor_procs(b, "conveyor") and not conveyor_procs(c, "conveyor")
        assert not conveyor_procs(admin, "dispatcher")

        gone = ssh_hosts.conveyor("cluster", "status", str(inventory))
        assert gone.returncode == 1
        gone_lines = {ln.split()[0]: ln for ln in gone.stdout.splitlines() if ln.strip()}
        assert gone_lines["b"].split(None, 2)[2].startswith("not running"), gone.stdout
        assert gone_lines["dispatcher"].split(None, 2)[2] == "not running", gone.stdout
        again_down = ssh_hosts.conveyor("cluster", "down", str(inventory))
        assert again_down.returncode == 0 and again_down.stdout.count("not running") == 3, again_down.stdout
        finished = True
    finally:
        if waiter is not None:
            stop_process(waiter)
        if not finished:  # the network's teardown kills whatever is left; this lets it drain first
            ssh_hosts.conveyor("cluster", "down", str(inventory), "--timeout", "5")


def test_cluster_up_reports_each_problem_on_one_line(ssh_hosts: SshHosts) -> None:
    net, tmp = ssh_hosts.net, ssh_hosts.tmp
    b, c, nossh = net["b"], net["c"], net["nossh"]
    old_python = tmp / "python3.8"
    old_python.write_text("#!/bin/sh\necho 3.8.10\nexit 1\n")
    old_python.chmod(0o755)
    bare = tmp / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=60)
    other_key = netns.ssh_keygen(tmp / "not_authorized")
    inventory = ssh_hosts.write_inventory([
        {"name": "gone", "address": nossh.address},
        {"name": "nopython", "address": b.address, "python": "/nonexistent/bin/python3"},
        {"name": "oldpython", "address": b.address, "python": str(old_python)},
        {"name": "bare", "address": b.address, "python": str(bare / "bin" / "python"), "workdir": str(tmp)},
        {"name": "nocmd", "address": b.address, "conveyor": "conveyor-not-installed"},
        {"name": "badkey", "address": c.address, "identity_file": str(other_key)},
        {"name": "ok", "address": c.address, "mode": "asyncio", "state_dir": str(tmp / "state-c")},
    ], state_dir=str(tmp / "state"))
    try:
        res = ssh_hosts.conveyor("cluster", "up", str(inventory))
        assert res.returncode == 1, res.stdout + res.stderr
        # one line per host: NAME  WHERE  OUTCOME
        lines = {ln.split()[0]: ln.split(None, 2)[2] for ln in res.stdout.splitlines() if ln.strip()}
        assert lines["dispatcher"].startswith("started (pid"), res.stdout
        assert lines["gone"].startswith("unreachable: ") and "refused" in lines["gone"], res.stdout
        assert lines["nopython"] == "wrong Python: /nonexistent/bin/python3 not found", res.stdout
        assert lines["oldpython"] == f"wrong Python: {old_python} is Python 3.8.10; conveyor needs 3.11 or newer"
        assert lines["bare"].startswith("conveyor missing: ") and "No module named" in lines["bare"], res.stdout
        assert lines["nocmd"].startswith("conveyor missing: conveyor-not-installed not found"), res.stdout
        assert lines["badkey"].startswith("unreachable: ") and "Permission denied" in lines["badkey"], res.stdout
        assert lines["ok"].startswith("started (pid") and "asyncio" in lines["ok"], res.stdout
    finally:
        ssh_hosts.conveyor("cluster", "down", str(inventory), "--timeout", "5")


def test_cluster_down_kills_a_worker_that_outlives_the_timeout(ssh_hosts: SshHosts) -> None:
    net = ssh_hosts.net
    admin, b = net["admin"], net["b"]
    address = f"tcp://{admin.address}:{PORT}"
    inventory = ssh_hosts.write_inventory(
        [{"name": "b", "address": b.address, "mode": "threads", "concurrency": 1, "drain_timeout": 60}],
        state_dir=str(ssh_hosts.tmp / "state"),
    )
    finished = False
    try:
        up = ssh_hosts.conveyor("cluster", "up", str(inventory), "--wait", "--timeout", "30")
        assert up.returncode == 0, up.stdout + up.stderr
        job = ssh_hosts.conveyor("submit", "--dispatcher", address, "tests.tasks:sleep", "60")
        assert job.returncode == 0, job.stderr
        wait_until(lambda: json.loads(ssh_hosts.conveyor("status", "--json", "-d", address).stdout)["running"] == 1,
                   20, what="the long task to start")
        down = ssh_hosts.conveyor("cluster", "down", str(inventory), "--timeout", "1")
        lines = {ln.split()[0]: ln.split(None, 2)[2] for ln in down.stdout.splitlines() if ln.strip()}
        assert lines["b"].startswith("killed (pid") and "did not stop within 1 s" in lines["b"], down.stdout
        assert lines["dispatcher"].startswith("stopped (pid"), down.stdout
        assert down.returncode == 0
        assert not conveyor_procs(b, "conveyor"), "the worker (and its task) should be gone"
        finished = True
    finally:
        if not finished:
            ssh_hosts.conveyor("cluster", "down", str(inventory), "--timeout", "5")


def test_cluster_rejects_a_bad_inventory(tmp_path: Path) -> None:
    bad = tmp_path / "hosts.toml"
    bad.write_text('[dispatcher]\naddress = "tcp://10.231.9.1:5555"\n[[hosts]]\naddress = "10.231.9.2"\nmod = "x"\n')
    res = subprocess.run([sys.executable, "-m", "conveyor", "cluster", "up", str(bad)], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "unknown key mod" in res.stderr and res.stdout == "", res.stderr
    missing = subprocess.run([sys.executable, "-m", "conveyor", "cluster", "status", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_an_inventory_may_ask_for_every_mode_and_no_other(tmp_path: Path) -> None:
    from conveyor.cluster.inventory import load_inventory
    from conveyor.errors import InventoryError

    hosts = tmp_path / "hosts.toml"
    modes = ["threads", "processes", "asyncio", "interpreters"]
    hosts.write_text('[dispatcher]\naddress = "tcp://10.231.9.1:5555"\n' + "".join(
        f'[[hosts]]\nname = "h{i}"\naddress = "10.231.9.{i + 2}"\nmode = "{m}"\n' for i, m in enumerate(modes)))
    workers = load_inventory(hosts).workers
    assert [w.mode for w in workers] == modes
    assert [w.args[w.args.index("--mode") + 1] for w in workers] == modes
    hosts.write_text('[dispatcher]\naddress = "tcp://10.231.9.1:5555"\n[[hosts]]\naddress = "10.231.9.2"\n'
                     'mode = "fibers"\n')
    with pytest.raises(InventoryError, match="choose threads, processes, asyncio, interpreters"):
        load_inventory(hosts)
