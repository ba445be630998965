"""Run rendered Kubernetes pod specs under Docker: the containers' contract, not Kubernetes.

Each container of a rendered pod becomes one `docker run` with what the kubelet would give it:

- the rendered command and args (after Kubernetes' `$(VAR)` expansion), env (value, fieldRef metadata.name
  and metadata.namespace, secretKeyRef), workingDir, the pod's hostname (its name), runAsUser/runAsGroup with
  fsGroup as a supplementary group, read-only root filesystem, dropped capabilities, no-new-privileges;
- its volumes: Secrets and ConfigMaps as directories laid out by the kubelet's AtomicWriter (tests/kube_volumes.py:
  `..data` symlink swaps on update, file modes from defaultMode/items, fsGroup ownership), mounted read-only,
  subPath mounts bound to the resolved file (so they see no updates, as in Kubernetes); emptyDir as a directory
  with mode 0777; a volume claim as a Docker named volume created empty (no copy of the image's files, like a
  new PersistentVolume) and given the fsGroup as the kubelet does;
- Services as network aliases of the pods their selector matches (a port must equal its target port); a pod may
  get a fixed address, which stands in for a Service's stable ClusterIP for clients on this host;
- exec probes run with `docker exec` at their period, timeout and thresholds, readiness and liveness only after
  the startup probe succeeded; their verdicts are recorded, never acted on (no restarts);
- pods deleted as the kubelet deletes them: preStop exec, SIGTERM, SIGKILL after terminationGracePeriodSeconds.

Anything else in a pod spec that would change what the containers see raises NotImplementedError rather than
being ignored. Scheduling, the network between nodes, admission and controllers are not emulated at all.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import secrets as random_names
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.kube_volumes import AtomicVolume, set_volume_ownership

LABEL = "conveyor-kube-test"
POD_FIELDS = {"automountServiceAccountToken", "enableServiceLinks", "terminationGracePeriodSeconds", "securityContext",
              "containers", "volumes", "imagePullSecrets", "nodeSelector", "tolerations", "affinity",
              "priorityClassName", "restartPolicy"}
CONTAINER_FIELDS = {"name", "image", "imagePullPolicy", "command", "args", "env", "ports", "startupProbe",
                    "readinessProbe", "livenessProbe", "securityContext", "resources", "volumeMounts", "workingDir",
                    "lifecycle"}


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} ... failed: {res.stderr.strip()[-2000:]}")
    return res


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of command, args and env values: $(VAR) if VAR is defined, $$ for a literal $."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and (end := text.find(")", i + 2)) != -1 and text[i + 2:end] in env:
            out.append(env[text[i + 2:end]])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _unsupported(what: str, fields: set[str], allowed: set[str]) -> None:
    extra = fields - allowed
    if extra:
        raise NotImplementedError(f"{what}: {sorted(extra)} not emulated")


def cleanup_stale() -> None:
    """Remove the containers, volumes and networks of earlier runs whose process is gone (killed runs)."""
    import psutil

    for kind, labels in (("container", ".Config.Labels"), ("volume", ".Labels"), ("network", ".Labels")):
        listing = docker(kind, "ls", "-aq" if kind == "container" else "-q", "--filter", f"label={LABEL}",
                         check=False).stdout.split()
        for ident in listing:
            owner = docker(kind, "inspect", "-f", f'{{{{index {labels} "{LABEL}"}}}}', ident, check=False).stdout
            pid = owner.strip()[2:].split("-", 1)[0]  # kt<pid>-<random>
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                docker(kind, "rm", *(["-f"] if kind != "network" else []), ident, check=False)


@dataclass
class Exited:
    code: int
    seconds: float
    killed: bool  # SIGKILLed at the end of the grace period


class Prober(threading.Thread):
    """One exec probe of one container, run as the kubelet runs it; `verdict` is what the kubelet concludes."""

    def __init__(self, container: str, kind: str, probe: dict[str, Any], after: Prober | None):
        super().__init__(daemon=True, name=f"probe-{kind}-{container}")
        _unsupported(f"{kind} probe", set(probe), {"exec", "periodSeconds", "timeoutSeconds", "failureThreshold",
                                                   "successThreshold", "initialDelaySeconds"})
        self.container, self.kind, self.probe, self.after = container, kind, probe, after
        self.command: list[str] = probe["exec"]["command"]
        self.period_s = float(probe.get("periodSeconds", 10))
        self.timeout_s = float(probe.get("timeoutSeconds", 1))
        self.failure_threshold = int(probe.get("failureThreshold", 3))
        self.success_threshold = int(probe.get("successThreshold", 1))
        # readiness starts false; liveness and startup count as passing until they fail (kubelet semantics)
        self.verdict: bool = kind != "readiness"
        self.succeeded_once = False
        self.history: list[tuple[float, bool, str]] = []
        self.stopped = threading.Event()
        self.active = threading.Event()  # cleared: no probe runs (between tests: no docker exec in flight)
        self.active.set()
        self.busy = threading.Lock()  # held while a probe runs
        self.proc: subprocess.Popen[str] | None = None  # the check in flight

    def run(self) -> None:
        if self.after is not None:
            while not self.after.succeeded_once:
                if self.stopped.wait(0.05):
                    return
        if self.stopped.wait(float(self.probe.get("initialDelaySeconds", 0))):
            return
        successes = failures = 0
        while not self.stopped.is_set():
            started = time.monotonic()
            with self.busy:
                if not self.active.is_set():
                    self.stopped.wait(0.05)
                    continue
                ok, output = self._once()
            if self.stopped.is_set():
                return
            if not self.active.is_set():
                continue  # paused mid-check: the check was cut short, it says nothing
            self.history.append((time.time(), ok, output))
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            if ok and successes >= self.success_threshold:
                self.verdict = self.succeeded_once = True
                if self.kind == "startup":
                    return  # the kubelet stops the startup probe once it succeeded
            elif not ok and failures >= self.failure_threshold:
                self.verdict = False
            self.stopped.wait(max(0.0, self.period_s - (time.monotonic() - started)))

    def _once(self) -> tuple[bool, str]:
        with subprocess.Popen(["docker", "exec", self.container, *self.command], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as proc:
            self.proc = proc
            try:
                output, _ = proc.communicate(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return False, f"timed out after {self.timeout_s:g} s"
            finally:
                self.proc = None
        return proc.returncode == 0, output.strip()[-300:]

    def pause(self) -> None:
        """No more checks until resume; one in flight is cut short (its `docker exec` ended)."""
        self.active.clear()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()


@dataclass
class Pod:
    name: str
    labels: dict[str, str]
    spec: dict[str, Any]
    containers: dict[str, str] = field(default_factory=dict)  # container name -> docker container name
    probers: dict[tuple[str, str], Prober] = field(default_factory=dict)  # (container, kind) -> prober
    volumes: dict[str, tuple[dict[str, Any], AtomicVolume]] = field(default_factory=dict)  # synced by the node
    ip: str | None = None  # a fixed address on the node's network

    def verdict(self, kind: str, container: str | None = None) -> bool:
        name = container or next(iter(self.containers))
        prober = self.probers.get((name, kind))
        return True if prober is None else prober.verdict

    def started(self, container: str | None = None) -> bool:
        prober = self.probers.get((container or next(iter(self.containers)), "startup"))
        return prober is None or prober.succeeded_once

    def ready(self, container: str | None = None) -> bool:
        return self.started(container) and self.verdict("readiness", container)

    def live(self, container: str | None = None) -> bool:
        return self.verdict("liveness", container) and self.verdict("startup", container)

    def docker_name(self, container: str | None = None) -> str:
        return self.containers[container or next(iter(self.containers))]

    def signal(self, sig: str, container: str | None = None) -> None:
        docker("kill", "--signal", sig, self.docker_name(container))

    def exited(self, container: str | None = None) -> int | None:
        state = docker("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", self.docker_name(container)).stdout
        running, code = state.split()
        return None if running == "true" else int(code)

    def logs(self, container: str | None = None) -> str:
        res = docker("logs", self.docker_name(container), check=False)
        return res.stdout + res.stderr

    def stdout(self, container: str | None = None) -> str:
        return docker("logs", self.docker_name(container), check=False).stdout


class Node:
    """A namespace's objects and the pods of one test, all on one Docker network; `close()` removes everything."""

    def __init__(self, image: str, workdir: Path, namespace: str = "conveyor"):
        self.image, self.workdir, self.namespace = image, workdir, namespace
        self.prefix = f"kt{os.getpid()}-{random_names.token_hex(2)}"
        self.network = f"{self.prefix}-net"
        self.secrets: dict[str, dict[str, bytes]] = {}
        self.config_maps: dict[str, dict[str, bytes]] = {}
        self.services: list[dict[str, Any]] = []
        self.pods: dict[str, Pod] = {}
        self.claims: set[str] = set()
        cleanup_stale()
        self.subnet = self._create_network()

    def _create_network(self) -> str:
        """A network with a subnet of its own (10.232-249.K.0/24), so pods can have fixed addresses."""
        rng = random.Random(os.getpid())
        for _ in range(20):
            subnet = f"10.{rng.randint(232, 249)}.{rng.randint(0, 255)}"
            res = docker("network", "create", "--label", f"{LABEL}={self.prefix}", "--subnet", f"{subnet}.0/24",
                         self.network, check=False)
            if res.returncode == 0:
                return subnet
            if "overlap" not in res.stderr:
                raise AssertionError(f"docker network create: {res.stderr.strip()}")
        raise AssertionError("no free subnet for the test network")

    # --- objects -----------------------------------------------------------------------------------------

    def apply(self, *objects: dict[str, Any]) -> None:
        """Create or replace Secrets, ConfigMaps and Services; pods' Secret and ConfigMap volumes then sync."""
        for obj in objects:
            name = obj["metadata"]["name"]
            if obj["kind"] == "Secret":
                self.secrets[name] = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            elif obj["kind"] == "ConfigMap":
                self.config_maps[name] = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            elif obj["kind"] == "Service":
                self.services = [s for s in self.services if s["metadata"]["name"] != name] + [obj]
            else:
                raise NotImplementedError(f"apply {obj['kind']}")
        for pod in self.pods.values():
            for source, volume in pod.volumes.values():
                volume.write(self._volume_files(source, pod))

    def _volume_files(self, volume: dict[str, Any], pod: Pod) -> dict[str, tuple[bytes, int]]:
        kind = "secret" if "secret" in volume else "configMap"
        source = volume[kind]
        _unsupported(f"{kind} volume", set(source), {"secretName", "name", "items", "defaultMode", "optional"})
        store = self.secrets if kind == "secret" else self.config_maps
        name = source.get("secretName") or source.get("name")
        data = store.get(name)
        if data is None:
            if source.get("optional"):
                return {}
            raise AssertionError(f"pod {pod.name}: {kind} {name} does not exist (the kubelet would not start it)")
        mode = int(source.get("defaultMode", 0o644))
        items = source.get("items") or [{"key": k, "path": k} for k in sorted(data)]
        files = {}
        for item in items:
            if item["key"] not in data:
                if source.get("optional"):
                    continue
                raise AssertionError(f"pod {pod.name}: {kind} {name} has no key {item['key']}")
            files[item["path"]] = (data[item["key"]], int(item.get("mode", mode)))
        return files

    # --- pods --------------------------------------------------------------------------------------------

    def run_workload(self, obj: dict[str, Any], ordinal: int = 0, ip: str | None = None) -> Pod:
        """A pod of a Deployment or StatefulSet (its claims from volumeClaimTemplates), or a bare Pod."""
        name = obj["metadata"]["name"]
        if obj["kind"] == "Pod":
            return self.run_pod(name, obj["metadata"].get("labels", {}), obj["spec"], ip)
        template = obj["spec"]["template"]
        spec = dict(template["spec"])
        if obj["kind"] == "StatefulSet":
            pod_name = f"{name}-{ordinal}"
            spec["volumes"] = [*spec.get("volumes", []), *(
                {"name": t["metadata"]["name"], "persistentVolumeClaim": {"claimName": f"{t['metadata']['name']}-"
                                                                                       f"{pod_name}"}}
                for t in obj["spec"].get("volumeClaimTemplates", []))]
        else:
            template_hash = hashlib.sha256(repr(template).encode()).hexdigest()[:10]
            pod_name = f"{name}-{template_hash}-{random_names.token_hex(3)[:5]}"
        return self.run_pod(pod_name, template["metadata"]["labels"], spec, ip)

    def run_pod(self, name: str, labels: dict[str, str], spec: dict[str, Any], ip: str | None = None) -> Pod:
        """Start a pod; `ip` (an address of this node's subnet) fixes its address, e.g. to stand in for the
        stable ClusterIP of the Service in front of it, which this host's clients then use."""
        _unsupported("pod spec", set(spec), POD_FIELDS)
        assert spec.get("enableServiceLinks") is False, "service links (env per Service) are not emulated"
        assert spec.get("automountServiceAccountToken") is False, "service account tokens are not emulated"
        pod = Pod(name, labels, spec, ip=ip)
        self.pods[name] = pod
        pod_dir = self.workdir / name
        pod_dir.mkdir(parents=True)
        security = spec.get("securityContext", {})
        fs_group = security.get("fsGroup")
        volumes: dict[str, list[str]] = {}  # name -> ["type=bind,src=..."], subPath resolved per mount
        for volume in spec.get("volumes", []):
            vname = volume["name"]
            if "secret" in volume or "configMap" in volume:
                atomic = AtomicVolume(pod_dir / "volumes" / vname, fs_group)
                atomic.write(self._volume_files(volume, pod))
                pod.volumes[vname] = (volume, atomic)
                volumes[vname] = ["bind", str(atomic.root)]
            elif "emptyDir" in volume:
                path = pod_dir / "volumes" / vname
                path.mkdir(parents=True)
                os.chmod(path, 0o777)
                set_volume_ownership(path, fs_group, read_only=False)
                volumes[vname] = ["bind", str(path)]
            elif "persistentVolumeClaim" in volume:
                claim = f"{self.prefix}-{volume['persistentVolumeClaim']['claimName']}"
                if claim not in self.claims:
                    docker("volume", "create", "--label", f"{LABEL}={self.prefix}", claim)
                    self.claims.add(claim)
                mountpoint = Path(docker("volume", "inspect", "-f", "{{.Mountpoint}}", claim).stdout.strip())
                assert mountpoint.is_dir(), f"the claim's volume {mountpoint} is not on this host"
                set_volume_ownership(mountpoint, fs_group, read_only=False)
                volumes[vname] = ["volume", claim]
            else:
                raise NotImplementedError(f"volume {vname}: {sorted(set(volume) - {'name'})} not emulated")
        aliases = self._service_aliases(pod)
        for container in spec["containers"]:
            self._start_container(pod, container, volumes, aliases)
        return pod

    def _service_aliases(self, pod: Pod) -> list[str]:
        aliases = []
        ports = {p.get("name"): p["containerPort"] for c in pod.spec["containers"] for p in c.get("ports", [])}
        for svc in self.services:
            selector = svc["spec"].get("selector") or {}
            if selector and selector.items() <= pod.labels.items():
                for port in svc["spec"]["ports"]:
                    target = port.get("targetPort", port["port"])
                    number = ports.get(target) if isinstance(target, str) else target
                    if number != port["port"]:
                        raise NotImplementedError(f"service {svc['metadata']['name']}: port {port['port']} -> "
                                                  f"{target} ({number}): only equal ports are emulated")
                aliases.append(svc["metadata"]["name"])
        return aliases

    def _start_container(self, pod: Pod, c: dict[str, Any], volumes: dict[str, list[str]], aliases: list[str]) -> None:
        _unsupported(f"container {c['name']}", set(c), CONTAINER_FIELDS)
        cname = f"{self.prefix}-{pod.name}-{c['name']}"
        pod.containers[c["name"]] = cname
        security = {**pod.spec.get("securityContext", {}), **c.get("securityContext", {})}
        run = ["run", "-d", "--name", cname, "--hostname", pod.name, "--network", self.network,
               "--label", f"{LABEL}={self.prefix}"]
        run += [a for alias in aliases for a in ("--network-alias", alias)]
        run += ["--ip", pod.ip] if pod.ip else []
        run += self._security_flags(security)
        run += self._resource_flags(c.get("resources", {}))
        env = self._env(pod, c)
        run += [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        if "workingDir" in c:
            run += ["-w", c["workingDir"]]
        for mount in c.get("volumeMounts", []):
            _unsupported("volumeMount", set(mount), {"name", "mountPath", "readOnly", "subPath"})
            kind, source = volumes[mount["name"]]
            api_data = any(mount["name"] == v["name"] and ("secret" in v or "configMap" in v)
                           for v in pod.spec.get("volumes", []))
            read_only = mount.get("readOnly", False) or api_data  # Secret and ConfigMap volumes are always read-only
            if "subPath" in mount:
                assert kind == "bind", "subPath of a claim is not emulated"
                source = os.path.realpath(os.path.join(source, mount["subPath"]))  # as the kubelet resolves it
            spec = f"type={kind},src={source},dst={mount['mountPath']}"
            spec += ",volume-nocopy" if kind == "volume" else ""
            run += ["--mount", spec + (",readonly" if read_only else "")]
        command = [expand(a, env) for a in c.get("command", [])]
        args = [expand(a, env) for a in c.get("args", [])]
        if command:
            run += ["--entrypoint", command[0], c["image"], *command[1:], *args]
        else:
            run += [c["image"], *args]
        docker(*run)
        startup = None
        for kind in ("startup", "readiness", "liveness"):
            if f"{kind}Probe" in c:
                prober = Prober(cname, kind, c[f"{kind}Probe"], after=startup if kind != "startup" else None)
                pod.probers[(c["name"], kind)] = prober
                startup = prober if kind == "startup" else startup
                prober.start()

    @staticmethod
    def _security_flags(sc: dict[str, Any]) -> list[str]:
        _unsupported("securityContext", set(sc), {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup",
                                                  "seccompProfile", "allowPrivilegeEscalation",
                                                  "readOnlyRootFilesystem", "capabilities", "supplementalGroups"})
        flags = []
        if "runAsUser" in sc:
            flags += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
        if sc.get("runAsNonRoot"):
            assert sc.get("runAsUser", 0) != 0, "runAsNonRoot with uid 0: the kubelet refuses to start it"
        for gid in [sc["fsGroup"]] if "fsGroup" in sc else []:
            flags += ["--group-add", str(gid)]
        flags += [a for gid in sc.get("supplementalGroups", []) for a in ("--group-add", str(gid))]
        if sc.get("readOnlyRootFilesystem"):
            flags.append("--read-only")
        if sc.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
        caps = sc.get("capabilities", {})
        flags += [a for cap in caps.get("drop", []) for a in ("--cap-drop", cap)]
        flags += [a for cap in caps.get("add", []) for a in ("--cap-add", cap)]
        profile = sc.get("seccompProfile", {"type": "RuntimeDefault"})["type"]
        assert profile in ("RuntimeDefault", "Unconfined"), f"seccomp {profile} is not emulated"
        if profile == "Unconfined":
            flags += ["--security-opt", "seccomp=unconfined"]
        return flags

    @staticmethod
    def _resource_flags(resources: dict[str, Any]) -> list[str]:
        limits = resources.get("limits", {})
        _unsupported("resource limits", set(limits), {"cpu", "memory"})
        flags = []
        if "cpu" in limits:
            cpu = str(limits["cpu"])
            flags += ["--cpus", str(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu))]
        if "memory" in limits:
            flags += ["--memory", str(limits["memory"]).replace("i", "").lower()]
        return flags

    def _env(self, pod: Pod, c: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for var in c.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(str(var["value"]), env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                field_path = source["fieldRef"]["fieldPath"]
                values = {"metadata.name": pod.name, "metadata.namespace": self.namespace}
                if field_path not in values:
                    raise NotImplementedError(f"env {var['name']}: fieldRef {field_path}")
                env[var["name"]] = values[field_path]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]].decode()
            else:
                raise NotImplementedError(f"env {var['name']}: {sorted(source)}")
        return env

    def delete_pod(self, pod: Pod, grace_s: float | None = None) -> dict[str, Exited]:
        """Stop a pod as the kubelet does: preStop, SIGTERM, SIGKILL after the grace period; then remove it."""
        grace = float(pod.spec.get("terminationGracePeriodSeconds", 30) if grace_s is None else grace_s)
        for prober in pod.probers.values():
            prober.stopped.set()
        started = time.monotonic()
        for c in pod.spec["containers"]:
            pre_stop = c.get("lifecycle", {}).get("preStop")
            if pre_stop is not None:
                _unsupported("preStop", set(pre_stop), {"exec"})
                subprocess.run(["docker", "exec", pod.containers[c["name"]], *pre_stop["exec"]["command"]],
                               capture_output=True, timeout=grace)
        for cname in pod.containers.values():
            docker("kill", "--signal", "SIGTERM", cname, check=False)
        out: dict[str, Exited] = {}
        for name, cname in pod.containers.items():
            killed = False
            while pod.exited(name) is None:
                if time.monotonic() - started > grace:
                    docker("kill", "--signal", "SIGKILL", cname, check=False)
                    killed = True
                    while pod.exited(name) is None:
                        time.sleep(0.05)
                    break
                time.sleep(0.05)
            out[name] = Exited(int(pod.exited(name) or 0), time.monotonic() - started, killed)
        for prober in pod.probers.values():
            prober.join(10)
        for cname in pod.containers.values():
            docker("rm", "-f", cname, check=False)
        del self.pods[pod.name]
        shutil.rmtree(self.workdir / pod.name, ignore_errors=True)
        return out

    def pause_probes(self) -> None:
        """No probe runs until resume_probes() (none is in flight when this returns)."""
        for pod in self.pods.values():
            for prober in pod.probers.values():
                prober.pause()
        for pod in self.pods.values():
            for prober in pod.probers.values():
                with prober.busy:
                    pass

    def resume_probes(self) -> None:
        for pod in self.pods.values():
            for prober in pod.probers.values():
                prober.active.set()

    def close(self) -> None:
        for pod in list(self.pods.values()):
            for prober in pod.probers.values():
                prober.stopped.set()
        ids = docker("ps", "-aq", "--filter", f"label={LABEL}={self.prefix}", check=False).stdout.split()
        if ids:
            docker("rm", "-f", *ids, check=False, timeout=120)
        for pod in self.pods.values():
            for prober in pod.probers.values():
                prober.join(10)
        self.pods.clear()
        for claim in self.claims:
            docker("volume", "rm", "-f", claim, check=False)
        docker("network", "rm", self.network, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)
