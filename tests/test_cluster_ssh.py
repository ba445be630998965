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
                        tables: dict[str, dict[str, Any]] | None = None, **defaults: Any) -> Path:
        """hosts.toml: [defaults], [dispatcher] (local, on admin), `tables` ([backup], [witness]), [[hosts]]."""
        admin = self.net["admin"]
        disp = {"host": "local", "address": f"tcp://{admin.address}:{PORT}",
                "bind": f"tcp://{admin.address}:{PORT}", "journal": False, "insecure": True,
                "state_dir": str(self.tmp / "state-admin")}
        disp.update(dispatcher or {})
        lines = ["[defaults]", *_toml_items(self.ssh_defaults(**defaults)), "", "[dispatcher]", *_toml_items(disp)]
        for name, table in (tables or {}).items():
            lines += ["", f"[{name}]", *_toml_items(table)]
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


def test_cluster_runs_a_standby_pair_with_a_witness(ssh_hosts: SshHosts) -> None:
    """The primary on admin (local), the backup on b and the witness on c (over ssh), workers on b and c."""
    net, tmp = ssh_hosts.net, ssh_hosts.tmp
    admin, b, c = net["admin"], net["b"], net["c"]
    primary, backup = f"tcp://{admin.address}:{PORT}", f"tcp://{b.address}:{PORT}"
    inventory = ssh_hosts.write_inventory(
        [{"name": "b", "address": b.address, "mode": "threads", "concurrency": 2, "state_dir": str(tmp / "state-b")},
         {"name": "c", "address": c.address, "mode": "threads", "concurrency": 2, "state_dir": str(tmp / "state-c")}],
        dispatcher={"journal": str(tmp / "primary.db"), "pair_bind": f"tcp://{admin.address}:{PORT + 1}",
                    "failover_timeout": 1},
        tables={
            "backup": {"host": "b", "address": backup, "bind": backup, "journal": str(tmp / "backup.db"),
                       "insecure": True},
            "witness": {"host": "c", "address": f"tcp://{c.address}:5557", "bind": f"tcp://{c.address}:5557",
                        "state": str(tmp / "witness.epoch")},
        },
    )
    finished = False
    try:
        up = ssh_hosts.conveyor("cluster", "up", str(inventory), "--wait", "--timeout", "30")
        assert up.returncode == 0, up.stdout + up.stderr
        lines = [ln for ln in up.stdout.splitlines() if ln.strip()]
        assert [ln.split()[0] for ln in lines[:5]] == ["witness", "dispatcher", "backup", "b", "c"], up.stdout
        by = {ln.split()[0]: ln for ln in lines}
        assert "started (pid" in by["witness"] and f"tcp://{c.address}:5557" in by["witness"], up.stdout
        assert "started (pid" in by["dispatcher"] and f"{primary} (primary)" in by["dispatcher"], up.stdout
        assert "started (pid" in by["backup"] and f"{backup} (backup)" in by["backup"], up.stdout
        assert f"all 2 worker(s) registered with the active dispatcher of {primary}, {backup}" in up.stdout
        worker_cmd = Path(f"/proc/{conveyor_procs(c, '--name c')[0]}/cmdline").read_bytes().split(b"\0")
        assert worker_cmd[worker_cmd.index(b"--connect") + 1].decode() == f"{primary},{backup}"

        # a job through a client that knows both addresses
        script = (f"from conveyor import Client\nwith Client({[primary, backup]!r}, connect_timeout=10) as cl:\n"
                  "    print(cl.submit('tests.tasks:add', 20, 22).result(timeout=30))\n")
        job = admin.run([sys.executable, "-c", script], cwd=ROOT, timeout=60)
        assert (job.returncode, job.stdout.strip()) == (0, "42"), job.stderr

        # up again: nothing new starts
        again = ssh_hosts.conveyor("cluster", "up", str(inventory), "--json")
        assert again.returncode == 0, again.stdout + again.stderr
        assert {n: h["state"] for n, h in by_name(again).items()} == dict.fromkeys(
            ("witness", "dispatcher", "backup", "b", "c"), "already-running")
        assert len(conveyor_procs(b, "--role backup")) == 1 and len(conveyor_procs(c, "conveyor witness")) == 1

        # status asks each dispatcher: one active, one passive, and the workers as the active sees them
        st = ssh_hosts.conveyor("cluster", "status", str(inventory))
        assert st.returncode == 0, st.stdout + st.stderr
        st_lines = {ln.split()[0]: ln for ln in st.stdout.splitlines() if ln.strip()}
        assert "running (pid" in st_lines["witness"], st.stdout
        assert f"{primary} (primary): active in epoch 1" in st_lines["dispatcher"], st.stdout
        assert "2 worker(s)" in st_lines["dispatcher"] and "1 succeeded" in st_lines["dispatcher"], st.stdout
        assert f"{backup} (backup): passive in epoch 1" in st_lines["backup"], st.stdout
        assert f"registered from {c.address} (threads" in st_lines["c"], st.stdout
        st_json = ssh_hosts.conveyor("cluster", "status", str(inventory), "--json")
        pair = json.loads(st_json.stdout)["pair"]
        assert [(d["address"], d["state"]) for d in pair["dispatchers"]] == [(primary, "active"), (backup, "passive")]

        # down: workers, then both dispatchers, then the witness; nothing is left running
        down = ssh_hosts.conveyor("cluster", "down", str(inventory))
        assert down.returncode == 0, down.stdout + down.stderr
        down_lines = [ln for ln in down.stdout.splitlines() if ln.strip()]
        assert [ln.split()[0] for ln in down_lines] == ["b", "c", "dispatcher", "backup", "witness"], down.stdout
        assert all("stopped (pid" in ln for ln in down_lines), down.stdout
        for host in (admin, b, c):
            assert not conveyor_procs(host, "conveyor"), f"left running on {host.name}"
        finished = True
    finally:
        if not finished:
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


PAIR = """
[dispatcher]
address = "tcp://10.231.9.1:5555"
journal = "/var/lib/conveyor/journal.db"
insecure = true
[backup]
host = "h2"
address = "tcp://10.231.9.2:5555"
insecure = true
[witness]
host = "h3"
address = "tcp://10.231.9.3:5557"
[[hosts]]
name = "h2"
address = "10.231.9.2"
[[hosts]]
name = "h3"
address = "10.231.9.3"
"""


def test_a_pair_in_the_inventory_gives_each_process_its_role_peer_and_witness(tmp_path: Path) -> None:
    from conveyor.cluster.inventory import load_inventory

    hosts = tmp_path / "hosts.toml"
    hosts.write_text(PAIR.replace('insecure = true\n[backup]', 'insecure = true\nfailover_timeout = 1.5\n[backup]'))
    inv = load_inventory(hosts)
    assert [p.name for p in inv.processes] == ["witness", "dispatcher", "backup", "h2", "h3"]
    assert inv.dispatcher.args == [
        "dispatcher", "--bind", "tcp://0.0.0.0:5555", "--journal", "/var/lib/conveyor/journal.db", "--role", "primary",
        "--peer", "tcp://10.231.9.2:5556", "--pair-bind", "tcp://0.0.0.0:5556", "--failover-timeout", "1.5",
        "--witness", "tcp://10.231.9.3:5557", "--insecure"]
    assert inv.backup is not None and inv.backup.target.address == "10.231.9.2"
    assert inv.backup.args[inv.backup.args.index("--peer") + 1] == "tcp://10.231.9.1:5556"
    assert inv.backup.file_stem == "dispatcher-backup" and inv.backup.role == "backup"
    assert inv.witness is not None and inv.witness.args == [
        "witness", "--bind", "tcp://0.0.0.0:5557", "--state", "~/.local/state/conveyor/witness.epoch",
        "--failover-timeout", "1.5"]
    assert all(w.args[w.args.index("--connect") + 1] == "tcp://10.231.9.1:5555,tcp://10.231.9.2:5555"
               for w in inv.workers)


@pytest.mark.parametrize(("edit", "message"), [
    (("[witness]", "[witness]\nstate = 3"), "[witness] state: expected str, got 3"),
    (('host = "h2"\naddress = "tcp://10.231.9.2:5555"', 'address = "tcp://10.231.9.1:5555"'),
     "[backup] address 'tcp://10.231.9.1:5555' is the [dispatcher]'s too"),
    (('host = "h2"\naddress = "tcp://10.231.9.2:5555"', 'address = "10.231.9.2"'),
     "[backup] address must look like tcp://HOST:PORT, got '10.231.9.2'"),
    (('[backup]\nhost = "h2"', '[backup]\nhost = "h9"'), "[backup] host 'h9': use \"local\" or the name"),
    (('[backup]\n', '[backup]\nfailover_timeout = 2\n'), "[backup]: unknown key failover_timeout"),
    (("insecure = true\n[backup]", "insecure = true\nfailover_timeout = 0\n[backup]"),
     "[dispatcher] failover_timeout must be a positive number of seconds, got 0"),
    (('journal = "/var/lib/conveyor/journal.db"', "journal = false"), "[dispatcher] journal = false: a standby pair"),
    (("insecure = true\n[backup]", 'insecure = true\npair_bind = "tcp://0.0.0.0:5555"\n[backup]'),
     "[dispatcher] pair_bind 'tcp://0.0.0.0:5555' has the port of bind"),
    (('host = "h2"\naddress = "tcp://10.231.9.2:5555"',
      'address = "tcp://10.231.9.2:5557"\njournal = "/var/lib/conveyor/journal.db"'),
     "[backup] journal: the same file as [dispatcher]'s on the same host"),
    (('host = "h2"\naddress = "tcp://10.231.9.2:5555"', 'address = "tcp://10.231.9.2:5556"\njournal = "b.db"'),
     "[backup] bind: port 5556 is also [dispatcher] pair_bind on the same host"),
    (('insecure = true\n[backup]', 'keys = "/etc/conveyor/keys"\n[backup]'), "[dispatcher] sets keys but [backup]"),
    (('[witness]\n', '[witness]\nkeys = "/etc/conveyor/keys"\n'), "[witness] keys: the dispatchers use no keys"),
    (('[[hosts]]\nname = "h3"', '[[hosts]]\nname = "witness"'), 'the name "witness" is taken by [witness]'),
    (('[backup]\nhost = "h2"\naddress = "tcp://10.231.9.2:5555"\ninsecure = true\n', ""),
     "[witness] is the third vote of a standby pair: add a [backup]"),
])
def test_a_bad_pair_in_the_inventory_is_one_line_saying_where(
    tmp_path: Path, edit: tuple[str, str], message: str,
) -> None:
    from conveyor.cluster.inventory import load_inventory
    from conveyor.errors import InventoryError

    assert edit[0] in PAIR
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(PAIR.replace(edit[0], edit[1], 1))
    with pytest.raises(InventoryError) as err:
        load_inventory(hosts)
    assert message in str(err.value) and str(err.value).startswith(f"{hosts}: ") and "\n" not in str(err.value)


def test_pair_keys_without_a_backup_are_refused_by_the_cli_in_one_line(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[dispatcher]\naddress = "tcp://10.231.9.1:5555"\nfailover_timeout = 2\n')
    res = subprocess.run([sys.executable, "-m", "conveyor", "cluster", "up", str(hosts)], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert (res.returncode, res.stdout) == (2, ""), res.stderr
    assert res.stderr == (f"error: {hosts}: [dispatcher] failover_timeout is for a standby pair: add a [backup] "
                          "dispatcher or remove failover_timeout\n")


def test_the_example_inventory_loads_and_so_does_its_commented_pair(tmp_path: Path) -> None:
    import re

    from conveyor.cluster.inventory import load_inventory

    example = ROOT / "deploy" / "hosts.example.toml"
    assert load_inventory(example).backup is None
    head, pair = example.read_text().split("# [backup]\n")
    pair = re.sub(r"^# (?=\[witness\]|[a-z_]+ = )(?!keys)", "", "[backup]\n" + pair, flags=re.M)  # it is insecure
    (tmp_path / "hosts.toml").write_text(head + pair)
    inv = load_inventory(tmp_path / "hosts.toml")
    assert inv.backup is not None and inv.witness is not None
    assert inv.addresses == ["tcp://10.0.0.5:5555", "tcp://10.0.0.11:5555"]
    assert inv.dispatcher.args[inv.dispatcher.args.index("--peer") + 1] == "tcp://10.0.0.11:5556"
