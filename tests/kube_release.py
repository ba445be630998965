"""A release of the chart run under Docker (tests/kube_docker.py): what `helm install` plus a kubelet would do,
minus Kubernetes.

The key Secrets come from `conveyor keys kubernetes-secrets` run on a key directory made by `conveyor keys
init`, as a user makes them; the chart is rendered with the real Helm engine; the pods run from the rendered
objects. A host client reaches the dispatcher at a fixed address on the pods' network, as it would reach a
Service's ClusterIP.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import Client
from conveyor.security.keys import add_peer, init_directory
from tests import kube_render
from tests.conftest import ROOT, conveyor_cmd, wait_until
from tests.conftest_netns import require
from tests.kube_docker import Node, Pod

# Task code for the `code.configMap` setting: a flat package in a ConfigMap, mounted as /app/kubetasks.
KUBETASKS = {
    "__init__.py": "",
    "jobs.py": "import socket\n\n\ndef where(x):\n    return [x, socket.gethostname()]\n",
}


GROUPS = [
    {"name": "cpu", "mode": "processes", "concurrency": 2, "replicas": 2, "readinessProbe": {"mode": "registered"}},
    {"name": "io", "mode": "asyncio", "concurrency": 50, "replicas": 1, "tags": ["io"],
     "keysSecret": "conveyor-worker-keys-io", "code": {"configMap": "kubetasks", "package": "kubetasks"}},
]
FAST = {"periodSeconds": 1, "timeoutSeconds": 5}  # probes at test speed: the same checks, shorter periods


def docker_values(image: str) -> dict[str, Any]:
    repository, _, tag = image.rpartition(":")
    return {
        "image": {"repository": repository, "tag": tag},
        "dispatcher": {"heartbeatIntervalSeconds": 0.5, "metrics": {"enabled": True},
                       "startupProbe": {**FAST, "failureThreshold": 60},
                       "readinessProbe": {**FAST, "failureThreshold": 2},
                       "livenessProbe": {**FAST, "periodSeconds": 3, "failureThreshold": 3}},
        "workerDefaults": {"drainTimeoutSeconds": 5, "heartbeatIntervalSeconds": 0.5,
                           "livenessProbe": {**FAST, "failureThreshold": 3, "maxAgeSeconds": 2},
                           "readinessProbe": {**FAST, "periodSeconds": 2, "failureThreshold": 2}},
        "workerGroups": GROUPS,
    }


def config_map(name: str, files: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": files}


class Release:
    def __init__(self, node: Node, keys: Path, values: dict[str, Any]):
        self.node, self.keys, self.values = node, keys, values
        self.objects = kube_render.documents(kube_render.render(values))
        self.node.apply(*self.of_kind("Service"), config_map("kubetasks", KUBETASKS))
        self.apply_secrets()
        self.host_keys = self.client_keys(keys.parent / "client-keys")  # what a client outside the cluster uses
        self.pods: dict[str, list[Pod]] = {}  # workload name -> its running pods
        self.dispatcher = f"{kube_render.FULLNAME}-dispatcher"
        ports = self.workload(self.dispatcher)["spec"]["template"]["spec"]["containers"][0]["ports"]
        self.ports = {p["name"]: p["containerPort"] for p in ports}
        # every dispatcher pod gets this address: clients on this host use it as they would the Service's ClusterIP
        self.dispatcher_ip = f"{node.subnet}.10"

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def workload(self, name: str) -> dict[str, Any]:
        (obj,) = [o for o in self.objects if o["metadata"]["name"] == name
                  and o["kind"] in ("Deployment", "StatefulSet", "Pod")]
        return obj

    def secrets(self) -> list[dict[str, Any]]:
        """`conveyor keys kubernetes-secrets KEYS --release conveyor`, parsed."""
        import yaml

        res = subprocess.run(conveyor_cmd("keys", "kubernetes-secrets", str(self.keys), "--release",
                                          kube_render.RELEASE), capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert res.returncode == 0, res.stderr
        return [s for s in yaml.safe_load_all(res.stdout) if s]

    def apply_secrets(self) -> None:
        """`conveyor keys kubernetes-secrets ... | kubectl apply -f -`: mounted copies follow (a kubelet sync)."""
        self.node.apply(*self.secrets())

    def start(self, name: str) -> Pod:
        obj = self.workload(name)
        pods = self.pods.setdefault(name, [])
        ip = self.dispatcher_ip if name == self.dispatcher else None
        pod = self.node.run_workload(obj, ordinal=len(pods) if obj["kind"] == "StatefulSet" else 0, ip=ip)
        pods.append(pod)
        return pod

    def stop(self, pod: Pod, grace_s: float | None = None) -> dict[str, Any]:
        """Delete a pod (a scale-down, a rollout, a StatefulSet pod deleted): the kubelet's SIGTERM and grace."""
        for pods in self.pods.values():
            if pod in pods:
                pods.remove(pod)
        return dict(self.node.delete_pod(pod, grace_s))

    def client_keys(self, target: Path) -> Path:
        """The client Secret's files in a directory, as NOTES.txt says to copy them out."""
        (secret,) = [s for s in self.secrets() if s["metadata"]["name"] == f"{kube_render.FULLNAME}-client-keys"]
        target.mkdir(mode=0o700, exist_ok=True)
        for name, value in secret["data"].items():
            path = target / name
            path.write_bytes(base64.b64decode(value))
            path.chmod(0o600)
        return target

    def client(self, keys: Path, **kwargs: Any) -> Client:
        """A client on this host, connected to the dispatcher's stable address."""
        return Client(f"tcp://{self.dispatcher_ip}:{self.ports['conveyor']}", keys=keys, **kwargs)


# --- fixtures (tests/test_helm.py imports them) ----------------------------------------------------------


@pytest.fixture(scope="session")
def helm_installed() -> None:
    """Before the image is built: without Helm nothing here can run."""
    require(kube_render.missing_helm())


@pytest.fixture(scope="module", name="release")
def release_fixture(helm_installed: None, conveyor_image: str,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The chart's dispatcher and two worker groups (cpu x2, io x1) running under Docker."""
    tmp = tmp_path_factory.mktemp("kube")
    keys = tmp / "keys"
    init_directory(keys)
    add_peer(keys, "worker", "io")  # the io group's own key: revoking it stops that group only
    node = Node(conveyor_image, tmp / "pods")
    try:
        rel = Release(node, keys, docker_values(conveyor_image))
        dispatcher = rel.start(rel.dispatcher)
        for group in GROUPS:
            for _ in range(group["replicas"]):
                rel.start(f"conveyor-worker-{group['name']}")
        wait_until(lambda: dispatcher.ready(), 60, what=f"the dispatcher to be ready:\n{dispatcher.logs()[-2000:]}")
        node.pause_probes()
        yield rel
    finally:
        node.close()


@pytest.fixture(name="kube")
def kube_fixture(release: Release) -> Iterator[Release]:
    """The release with its probes running for this test (paused between tests: no docker exec in flight)."""
    release.node.resume_probes()
    try:
        yield release
    finally:
        release.node.pause_probes()


def workers_of(rel: Release, group: str) -> list[Pod]:
    return rel.pods.get(f"conveyor-worker-{group}", [])


def registered(client: Client) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in client.status()["workers"]}
