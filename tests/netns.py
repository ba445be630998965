"""A private network of test hosts: one Linux bridge, N network namespaces, a veth pair per host.

    net = Network(["a", "b", "c"])           # hosts at 10.231.K.1, .2, .3 (K differs per network)
    proc = net["a"].popen([sys.executable, "-m", "conveyor", "dispatcher", "--bind", f"tcp://{net['a'].address}:5555"])
    net["b"].run(["ip", "addr"])             # any command, inside host b's namespace
    net["c"].cut(); net["c"].restore()       # take c's link down (it is off the network) and bring it back
    net["c"].netem(delay_ms=50, loss_pct=1)  # where the kernel has sch_netem (netem_available())
    net.close()                              # idempotent; also runs at exit

Everything is named with a per-run prefix `cv<pid in hex>n<counter>`: namespaces `PREFIX-NAME`, the
bridge `PREFIX-br`, the root-side veth ends `PREFIX-<i>` (the namespace side is `eth0`). The root
namespace gets no address on the bridge, so the test subnet never routes anywhere else, and only
addresses of these namespaces are ever targeted. `cleanup_stale()` removes what runs that died without
cleaning up left behind (their pid is gone). Needs root and iproute2; `missing_capability()` says why not.

Docker sets the iptables FORWARD policy to DROP and sends bridged frames through iptables: a Network
inserts `-i BR -o BR -j ACCEPT` for its bridge (tagged with a comment) and removes it on close.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

SUBNET_BASE = "10.231"  # 10.231.K.0/24; one K per network of a run
RULE_COMMENT = "conveyor-netns"
STALE_RE = re.compile(r"^cv([0-9a-f]+)n(\d+)-")
_counter = itertools.count()
_live: list[Network] = []


class NetnsError(RuntimeError):
    pass


def _run(args: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@cache
def missing_capability() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` not found: install iproute2"
    probe = f"cv{os.getpid():x}n999-probe"
    created = _run(["ip", "netns", "add", probe], check=False)
    if created.returncode != 0:
        return f"cannot create a network namespace: {created.stderr.strip()}"
    try:
        bridge = _run(["ip", "-n", probe, "link", "add", "probe-br", "type", "bridge"], check=False)
        if bridge.returncode != 0:
            return f"cannot create a Linux bridge: {bridge.stderr.strip()}"
        veth = _run(["ip", "-n", probe, "link", "add", "probe-a", "type", "veth", "peer", "name", "probe-b"],
                    check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


@cache
def netem_available() -> bool:
    """True if `tc qdisc ... netem` works here (the kernel may lack sch_netem)."""
    if missing_capability() is not None or shutil.which("tc") is None:
        return False
    probe = f"cv{os.getpid():x}n998-netem"
    if _run(["ip", "netns", "add", probe], check=False).returncode != 0:
        return False
    try:
        _run(["ip", "-n", probe, "link", "set", "lo", "up"], check=False)
        res = _run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                   check=False)
        return res.returncode == 0
    finally:
        _run(["ip", "netns", "del", probe], check=False)


def _stale(name: str) -> bool:
    m = STALE_RE.match(name)
    return m is not None and not _pid_alive(int(m.group(1), 16))


def _kill_namespace_processes(ns: str, grace: float = 3.0) -> None:
    """SIGTERM every process in a namespace, then SIGKILL what is left after `grace` seconds."""
    def pids() -> list[int]:
        out = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        return [int(p) for p in out if p.isdigit() and int(p) != os.getpid()]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        left = pids()
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids() and time.monotonic() < deadline:
            time.sleep(0.05)


def _forward_rules() -> list[str]:
    if shutil.which("iptables") is None:
        return []
    return _run(["iptables", "-w", "-S", "FORWARD"], check=False).stdout.splitlines()


def cleanup_stale() -> list[str]:
    """Remove namespaces, links and iptables rules left by runs whose process is gone; returns what went."""
    removed: list[str] = []
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if _stale(name):
            _kill_namespace_processes(name, grace=0.5)
            _run(["ip", "netns", "del", name], check=False)
            removed.append(f"netns {name}")
    for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if _stale(name):
                _run(["ip", "link", "del", name], check=False)
                removed.append(f"link {name}")
    for rule in _forward_rules():
        m = re.search(rf'--comment "?{RULE_COMMENT}:(\S+?)"?(\s|$)', rule)
        if m and _stale(m.group(1) + "-") and rule.startswith("-A "):
            _run(["iptables", "-w", "-D", *shlex.split(rule)[1:]], check=False)
            removed.append(f"iptables rule {rule}")
    return removed


class Host:
    """One namespace on the network: a `host` with its own address, ports and routing."""

    def __init__(self, network: Network, index: int, name: str, address: str):
        self.network = network
        self.index = index
        self.name = name
        self.address = address
        self.ns = f"{network.prefix}-{name}"
        self.veth = f"{network.prefix}-{index}"  # the root-namespace end, enslaved to the bridge
        self.ifname = "eth0"

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address}, ns={self.ns})"

    def cmd(self, args: Sequence[str]) -> list[str]:
        """A command line that runs `args` inside this host."""
        return ["ip", "netns", "exec", self.ns, *args]

    def run(self, args: Sequence[str], check: bool = False, timeout: float = 60.0, **kwargs: Any
            ) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.cmd(args), text=True, check=check, timeout=timeout, **kwargs)

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in this host (`ip netns exec` execs it: the Popen pid is the process itself).

        The network terminates it on close if the test has not; stop it yourself to see its exit code.
        """
        proc = subprocess.Popen(self.cmd(args), **kwargs)
        self.network.processes.append(proc)
        return proc

    def pids(self) -> list[int]:
        return [int(p) for p in _run(["ip", "netns", "pids", self.ns], check=False).stdout.split() if p.isdigit()]

    def cut(self) -> None:
        """Take the host off the network: its link goes down (established TCP connections just stall)."""
        _run(["ip", "link", "set", self.veth, "down"])

    def restore(self) -> None:
        _run(["ip", "link", "set", self.veth, "up"])

    @property
    def is_up(self) -> bool:
        out = _run(["ip", "-o", "link", "show", self.veth], check=False).stdout
        return "state UP" in out or ",UP" in out.split(">")[0]

    def netem(self, delay_ms: float = 0, jitter_ms: float = 0, loss_pct: float = 0) -> None:
        """Delay and/or drop this host's outgoing packets (tc netem). Raises NetnsError where unsupported."""
        if not netem_available():
            raise NetnsError("tc netem is not available here (the kernel lacks sch_netem, or tc is missing)")
        spec = ["delay", f"{delay_ms}ms"] + ([f"{jitter_ms}ms"] if jitter_ms else [])
        if loss_pct:
            spec += ["loss", f"{loss_pct}%"]
        _run(self.cmd(["tc", "qdisc", "replace", "dev", self.ifname, "root", "netem", *spec]))

    def clear_netem(self) -> None:
        _run(self.cmd(["tc", "qdisc", "del", "dev", self.ifname, "root"]), check=False)


class Network:
    """A bridge and one namespace per host name, created now and removed by close() (or at exit)."""

    def __init__(self, names: Iterable[str] | int = 2, subnet: str | None = None):
        reason = missing_capability()
        if reason is not None:
            raise NetnsError(reason)
        self.number = next(_counter)
        self.prefix = f"cv{os.getpid():x}n{self.number}"
        self.bridge = f"{self.prefix}-br"
        host_names = [chr(ord("a") + i) for i in range(names)] if isinstance(names, int) else list(names)
        if not host_names or len(host_names) > 200 or len(set(host_names)) != len(host_names):
            raise ValueError("give 1-200 distinct host names")
        self.subnet = ipaddress.ip_network(subnet or f"{SUBNET_BASE}.{self.number % 256}.0/24")
        addrs = itertools.islice(self.subnet.hosts(), len(host_names))
        self.hosts = [Host(self, i, n, str(a)) for i, (n, a) in enumerate(zip(host_names, addrs, strict=False))]
        self.processes: list[subprocess.Popen[Any]] = []
        self._rule: list[str] | None = None
        self._closed = False
        _live.append(self)
        _install_sigterm_handler()
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        prefix_len = self.subnet.prefixlen
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "link", "set", self.bridge, "up"])
        if shutil.which("iptables") is not None:
            rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-m", "comment",
                    "--comment", f"{RULE_COMMENT}:{self.prefix}", "-j", "ACCEPT"]
            if _run(["iptables", "-w", "-I", *rule], check=False).returncode == 0:
                self._rule = rule
        for host in self.hosts:
            _run(["ip", "netns", "add", host.ns])
            _run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", host.ifname, "netns", host.ns])
            _run(["ip", "link", "set", host.veth, "master", self.bridge])
            _run(["ip", "link", "set", host.veth, "up"])
            _run(["ip", "-n", host.ns, "addr", "add", f"{host.address}/{prefix_len}", "dev", host.ifname])
            _run(["ip", "-n", host.ns, "link", "set", host.ifname, "up"])
            _run(["ip", "-n", host.ns, "link", "set", "lo", "up"])

    def close(self) -> None:
        """Stop every process in the hosts, then remove namespaces, bridge and iptables rule. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.processes:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for host in self.hosts:  # also what the processes left behind (daemons, detached workers, sshd sessions)
            _kill_namespace_processes(host.ns)
            _run(["ip", "netns", "del", host.ns], check=False)
            _run(["ip", "link", "del", host.veth], check=False)  # gone with the namespace, normally
        _run(["ip", "link", "del", self.bridge], check=False)
        if self._rule is not None:
            _run(["iptables", "-w", "-D", *self._rule], check=False)
            self._rule = None
        if self in _live:
            _live.remove(self)


def _close_all() -> None:
    for net in list(_live):
        with contextlib.suppress(Exception):
            net.close()


atexit.register(_close_all)
_sigterm_installed = False


def _install_sigterm_handler() -> None:
    """Make SIGTERM unwind like Ctrl-C (finalizers and atexit run), unless someone else handles it."""
    global _sigterm_installed
    if _sigterm_installed:
        return
    _sigterm_installed = True
    with contextlib.suppress(ValueError):  # not the main thread
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            def on_sigterm(signum: int, frame: Any) -> None:
                raise KeyboardInterrupt("SIGTERM")

            signal.signal(signal.SIGTERM, on_sigterm)


# --- sshd inside a host ---------------------------------------------------------------------------


def ssh_keygen(path: Path, kind: str = "ed25519") -> Path:
    """A passphrase-less key pair at path and path.pub."""
    if not path.exists():
        _run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "conveyor-test", "-f", str(path)])
    return path


def sshd_path() -> str | None:
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/sbin/sshd") if Path(p).exists()), None)


def start_sshd(host: Host, directory: Path, authorized_keys: Path, timeout: float = 15.0) -> subprocess.Popen[Any]:
    """Run Debian's sshd in `host` on port 22: key-only login as any user holding a key in authorized_keys."""
    sshd = sshd_path()
    if sshd is None:
        raise NetnsError("sshd not found: install openssh-server")
    directory.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
    host_key = ssh_keygen(directory / "ssh_host_ed25519_key")
    config = directory / "sshd_config"
    config.write_text(
        "\n".join([
            f"ListenAddress {host.address}",
            "Port 22",
            f"HostKey {host_key}",
            f"PidFile {directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {authorized_keys}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "LogLevel INFO",
            "MaxStartups 50",
            "Subsystem sftp internal-sftp",
            "",
        ])
    )
    log_path = directory / "sshd.log"
    log = open(log_path, "ab")  # noqa: SIM115 - closed with the process
    proc = host.popen([sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + timeout
    while "Server listening" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise NetnsError(f"sshd did not start in {host.name}: {log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.02)
    return proc
