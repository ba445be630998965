"""The Helm chart (deploy/helm/conveyor), tested in the four layers a machine without a cluster allows
(docs/kubernetes.md says what each shows and what only a live cluster could):

1. render: the real Helm engine (helm-python-sdk) over tests/kube_render.py's VALUES_MATRIX, `helm lint --strict`,
   the rejections of values.schema.json and of the templates; the plain manifests equal a fresh render;
2. schema: every object strict against Kubernetes 1.30 and newer (kubernetes-validate), ScaledObjects against
   KEDA's CRD (tests/kube_validate.py);
3. semantics that no schema checks;
4. the rendered pod specs run under Docker (tests/kube_docker.py): the containers' contract, not Kubernetes.

Also `conveyor keys kubernetes-secrets`, and revocation through a kubelet-style `..data` symlink swap.
Without helm-python-sdk or kubernetes-validate (the k8s extra) these skip outside CI and fail with CI=true.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import Client
from conveyor.security.keys import add_peer, init_directory
from conveyor.security.kubernetes import kubernetes_secrets
from tests import kube_render, kube_validate
from tests.conftest import ROOT, Cluster, conveyor_cmd, wait_until
from tests.conftest_netns import require
from tests.kube_release import (
    Release,
    docker_values,
    helm_installed,
    kube_fixture,
    registered,
    release_fixture,
    workers_of,
)
from tests.kube_render import VALUES_MATRIX, arg, kinds, pod_specs
from tests.kube_volumes import AtomicVolume
from tests.test_compose import conveyor_image, docker_daemon

# fixtures from other modules: the image is built once per run (with tests/test_compose.py), the release once here
__all__ = ["conveyor_image", "docker_daemon", "helm_installed", "kube_fixture", "release_fixture"]

RENDERS: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture
def helm() -> None:
    require(kube_render.missing_helm())


def docs(name: str) -> list[dict[str, Any]]:
    """The objects of a matrix entry's render (cached: a render is deterministic, as a test below checks)."""
    require(kube_render.missing_helm())
    if name not in RENDERS:
        RENDERS[name] = kube_render.documents(kube_render.render(VALUES_MATRIX[name]))
    return RENDERS[name]


MATRIX = sorted(VALUES_MATRIX)

# --- 1. render ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MATRIX)
def test_the_chart_renders_the_same_twice_and_lints_clean(name: str, helm: None) -> None:
    values = VALUES_MATRIX[name]
    first, second = kube_render.render(values), kube_render.render(values)
    assert first == second, "the render is not deterministic"
    assert "conveyor/templates/NOTES.txt" in first and "kubectl port-forward" in first["conveyor/templates/NOTES.txt"]
    report = kube_render.lint(values)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert report["errors"] == [] and problems == [], report
    objs = docs(name)
    standard = {"helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by", "app.kubernetes.io/component"}
    assert all(standard <= o["metadata"]["labels"].keys() for o in objs)
    groups = values.get("workerGroups", [{"name": "default"}])
    assert len(kinds(objs, "Deployment")) == len(groups)
    assert len(kinds(objs, "ScaledObject")) == (len(groups) if name == "keda" else 0)
    assert len(kinds(objs, "StatefulSet")) == 1 and len(kinds(objs, "Service")) == 2
    assert len(kinds(objs, "Pod")) == (0 if values.get("tests", {}).get("enabled") is False else 1)


SCHEMA_REJECTS = [
    ({"workerGroups": [{"name": "cpu", "replica": 3}]}, "additional properties 'replica'"),
    ({"dispatcher": {"journal": {"enabled": True, "size": "lots"}}}, "/dispatcher/journal/size"),
    ({"workerGroups": [{"name": "CPU"}]}, "does not match pattern"),
    ({"workerGroups": [{"mode": "threads"}]}, "missing property 'name'"),
    ({"workerDefaults": {"mode": "fibers"}}, "/workerDefaults/mode"),
    ({"workerDefaults": {"terminationGraceMarginSeconds": 5}}, "minimum"),
    ({"workerDefaults": {"concurrency": 0}}, "/workerDefaults/concurrency"),
    ({"dispatcher": {"port": 70000}}, "/dispatcher/port"),
    ({"dispatcher": {"terminationGracePeriodSeconds": 5}}, "/dispatcher/terminationGracePeriodSeconds"),
    ({"insecure": "yes"}, "/insecure"),
    ({"image": {"tag": 1.1}}, "/image/tag"),
    ({"keys": {"workerSecret": "Not_A_Name"}}, "/keys/workerSecret"),
    ({"autoscaling": {"keda": {"serverAddress": "prometheus:9090"}}}, "serverAddress"),
    ({"logFormat": "xml"}, "/logFormat"),
]


@pytest.mark.parametrize(("values", "expected"), SCHEMA_REJECTS, ids=[e for _, e in SCHEMA_REJECTS])
def test_values_schema_rejects(values: dict[str, Any], expected: str, helm: None) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmValuesError, match=re.escape(expected)):
        kube_render.render(values)
    assert kube_render.lint(values)["errors"], "helm lint let it pass"


KEDA_ON = {"dispatcher": {"metrics": {"enabled": True}},
           "autoscaling": {"keda": {"enabled": True, "serverAddress": "http://prometheus:9090"}}}
TEMPLATE_REJECTS = [
    ({"workerGroups": [{"name": "a"}, {"name": "a"}]}, 'the name "a" is used twice'),
    ({"autoscaling": {"keda": {"enabled": True, "serverAddress": "http://p:9090"}}}, "needs dispatcher.metrics"),
    ({**KEDA_ON, "autoscaling": {"keda": {"enabled": True}}}, "autoscaling.keda.serverAddress"),
    ({**KEDA_ON, "workerDefaults": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "above maxReplicas"),
    ({"dispatcher": {"dashboard": {"enabled": True, "expose": True}}}, "needs dispatcher.dashboard.tokenSecret"),
    ({"workerDefaults": {"code": {"configMap": "mytasks"}}}, "code.package"),
]


@pytest.mark.parametrize(("values", "expected"), TEMPLATE_REJECTS, ids=[e for _, e in TEMPLATE_REJECTS])
def test_templates_reject(values: dict[str, Any], expected: str, helm: None) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmRenderError, match=re.escape(expected)):
        kube_render.render(values)


def test_the_plain_manifests_equal_a_fresh_render(helm: None) -> None:
    committed = kube_render.MANIFESTS.read_text()
    assert committed == kube_render.plain_manifests(), "stale: run python3 -m tests.kube_render --write"
    assert "helm.sh/hook" not in committed  # no test hook among the plain manifests


# --- 2. schema ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validators() -> tuple[str, ...]:
    require(kube_render.missing_helm() or kube_validate.missing_validators())
    versions = kube_validate.kubernetes_versions()
    assert versions[0] == "1.30.0" and len(versions) >= 8, versions
    return versions


@pytest.mark.parametrize("name", MATRIX)
def test_every_object_is_valid_for_kubernetes_1_30_and_newer(name: str, validators: tuple[str, ...]) -> None:
    errors = [e for obj in docs(name) for version in validators for e in kube_validate.validate(obj, version)]
    assert errors == []


def test_the_validators_reject_what_they_should(validators: tuple[str, ...]) -> None:
    objs = docs("keda")
    sts = kinds(objs, "StatefulSet")[0]
    typo = {**sts, "spec": {**sts["spec"], "replica": 1}}
    assert "'replica' was unexpected" in kube_validate.validate(typo, validators[0])[0]
    pod = {**kinds(objs, "Pod")[0]}
    pod["spec"] = {**pod["spec"], "terminationGracePeriodSeconds": "45"}
    assert kube_validate.validate(pod, validators[-1])
    scaled = kinds(objs, "ScaledObject")[0]
    trigger = {**scaled["spec"]["triggers"][0], "metadata": {"threshold": 4}}
    bad = {**scaled, "spec": {**scaled["spec"], "triggers": [trigger], "minReplicaCount": 50, "pollingIntervall": 1}}
    errors = " ".join(kube_validate.validate(bad, validators[0]))
    assert "'pollingIntervall' was unexpected" in errors and "4 is not of type 'string'" in errors
    assert "minReplicaCount must be less than or equal to maxReplicaCount" in errors


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_the_kubernetes_validate_command_accepts_the_plain_manifests(version: str, validators: tuple[str, ...]) -> None:
    tool = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    res = subprocess.run([tool, "--strict", "--quiet", "-k", version, str(kube_render.MANIFESTS)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# --- 3. semantics ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MATRIX)
def test_grace_periods_cover_the_drain(name: str) -> None:
    for obj, spec, _ in pod_specs(docs(name)):
        if obj["kind"] == "Deployment":
            drain_s = float(arg(spec["containers"][0], "--drain-timeout") or "nan")
            assert spec["terminationGracePeriodSeconds"] >= drain_s + 10, obj["metadata"]["name"]
        elif obj["kind"] == "StatefulSet":
            assert spec["terminationGracePeriodSeconds"] >= 15


@pytest.mark.parametrize("name", MATRIX)
def test_worker_liveness_never_asks_the_dispatcher(name: str) -> None:
    workers = kinds(docs(name), "Deployment")
    assert workers
    for obj in workers:
        container = obj["spec"]["template"]["spec"]["containers"][0]
        health_file = arg(container, "--health-file")
        for kind in ("livenessProbe", "startupProbe"):
            command = container[kind]["exec"]["command"]
            assert command[:3] == ["conveyor-healthcheck", "worker", "--local"], command
            assert "--address" not in command and not any("dispatcher" in c for c in command[3:]), command
            assert arg({"command": command}, "--health-file") == health_file  # the file the worker writes
        max_age_s = float(arg({"command": container["livenessProbe"]["exec"]["command"]}, "--max-age") or 0)
        assert max_age_s >= 3 * float(arg(container, "--heartbeat-interval") or 1)


@pytest.mark.parametrize("name", MATRIX)
def test_secrets_are_mounted_read_only_with_mode_0400(name: str) -> None:
    secret_volumes = 0
    for obj, spec, _ in pod_specs(docs(name)):
        secrets = {v["name"]: v["secret"] for v in spec.get("volumes", []) if "secret" in v}
        for volume in secrets.values():
            secret_volumes += 1
            assert volume["defaultMode"] == 0o400 and all(i.get("mode", 0o400) == 0o400
                                                          for i in volume.get("items", []))
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] in secrets:
                    assert mount.get("readOnly") is True, (obj["metadata"]["name"], mount)
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["fsGroup"]  # can read 0400(+g)
    assert (secret_volumes == 0) == (name == "insecure")


@pytest.mark.parametrize("name", MATRIX)
def test_selectors_match_their_pods_and_no_others(name: str) -> None:
    objs = docs(name)
    pods = {o["metadata"]["name"]: labels for o, _, labels in pod_specs(objs) if o["kind"] != "Pod"}
    for obj in kinds(objs, "Deployment") + kinds(objs, "StatefulSet"):
        selector = obj["spec"]["selector"]["matchLabels"]
        matched = [n for n, labels in pods.items() if selector.items() <= labels.items()]
        assert matched == [obj["metadata"]["name"]], (obj["metadata"]["name"], matched)
        assert not {"helm.sh/chart", "app.kubernetes.io/version"} & selector.keys()  # selectors are immutable
    dispatcher = kinds(objs, "StatefulSet")[0]["metadata"]["name"]
    for svc in kinds(objs, "Service"):
        selector = svc["spec"]["selector"]
        assert [n for n, labels in pods.items() if selector.items() <= labels.items()] == [dispatcher]
    for pdb in kinds(objs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert [n for n, labels in pods.items() if selector.items() <= labels.items()] == [pdb["metadata"]["name"]]
    names = {o["metadata"]["name"] for o in kinds(objs, "Deployment")}
    assert {s["spec"]["scaleTargetRef"]["name"] for s in kinds(objs, "ScaledObject")} <= names


@pytest.mark.parametrize("name", MATRIX)
def test_one_dispatcher_replica_with_a_journal_claim(name: str) -> None:
    objs = docs(name)
    (sts,) = kinds(objs, "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert sts["spec"]["replicas"] == 1
    if name == "no-journal":
        assert "--no-journal" in container["args"] and "volumeClaimTemplates" not in sts["spec"]
        return
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(arg(container, "--journal") or "").parent) == mounts[claim["metadata"]["name"]]
    address = f"tcp://{sts['metadata']['name']}:{container['ports'][0]['containerPort']}"
    for obj in kinds(objs, "Deployment"):
        assert arg(obj["spec"]["template"]["spec"]["containers"][0], "--connect") == address  # the Service


@pytest.mark.parametrize("name", MATRIX)
def test_no_disruption_budget_blocks_node_drains(name: str) -> None:
    objs = docs(name)
    dispatcher_labels = kinds(objs, "StatefulSet")[0]["spec"]["template"]["metadata"]["labels"]
    for pdb in kinds(objs, "PodDisruptionBudget"):
        spec = pdb["spec"]
        assert not spec["selector"]["matchLabels"].items() <= dispatcher_labels.items()
        assert not ("minAvailable" in spec and "maxUnavailable" in spec)  # the API server refuses both
        assert "minAvailable" not in spec and str(spec["maxUnavailable"]) not in ("0", "0%")
        assert spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow"  # a not-ready pod never blocks a drain
    assert len(kinds(objs, "PodDisruptionBudget")) == len(kinds(objs, "Deployment"))


def test_keda_scales_on_queued_and_running_jobs() -> None:
    objs = docs("keda")
    deployments = {o["metadata"]["name"]: o for o in kinds(objs, "Deployment")}
    for scaled in kinds(objs, "ScaledObject"):
        (trigger,) = scaled["spec"]["triggers"]
        query = trigger["metadata"]["query"]
        mode = arg(deployments[scaled["spec"]["scaleTargetRef"]["name"]]["spec"]["template"]["spec"]["containers"][0],
                   "--mode")
        assert trigger["type"] == "prometheus" and f'conveyor_queue_depth{{mode=~"{mode}|any"' in query
        assert f'conveyor_worker_busy_slots{{mode="{mode}"' in query  # running jobs count too
        assert query.count('namespace="conveyor"') == 2 and query.count("or vector(0)") == 2
        assert float(trigger["metadata"]["threshold"]) > 0
        assert "replicas" not in deployments[scaled["spec"]["scaleTargetRef"]["name"]]["spec"]  # KEDA owns it
    assert all("replicas" in d["spec"] for d in kinds(docs("groups"), "Deployment"))


@pytest.mark.parametrize("name", MATRIX)
def test_no_latest_image_by_default(name: str) -> None:
    for _, spec, _ in pod_specs(docs(name)):
        for container in spec["containers"]:
            repository, _, tag = container["image"].rpartition(":")
            assert repository and tag and tag != "latest" and "/" not in tag, container["image"]


def test_templates_never_ask_the_cluster() -> None:
    for path in (kube_render.CHART / "templates").rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert ".Capabilities" not in text and "lookup" not in text, path  # offline renders are deterministic


def test_pods_use_the_secrets_the_keys_command_prints(tmp_path: Path) -> None:
    init_directory(tmp_path / "keys")
    add_peer(tmp_path / "keys", "worker", "io")
    printed = {s.name for s in kubernetes_secrets(tmp_path / "keys", release=kube_render.RELEASE).secrets}
    for name in ("defaults", "groups"):
        used = {v["secret"]["secretName"] for _, spec, _ in pod_specs(docs(name)) for v in spec.get("volumes", [])
                if "secret" in v}
        assert used and used <= printed, used - printed


# --- conveyor keys kubernetes-secrets ----------------------------------------------------------------------


def test_the_keys_command_prints_secrets_of_a_key_directory(tmp_path: Path) -> None:
    require(kube_render.missing_yaml())
    import yaml

    keys = tmp_path / "keys"
    init_directory(keys)
    add_peer(keys, "worker", "gpu-1")
    add_peer(keys, "client", "Alice_1")  # no Kubernetes name: left out with a note
    add_peer(keys, "worker", "gone")
    (keys / "authorized" / "workers" / "gone.key").unlink()  # revoked: its host Secret is left out too
    res = subprocess.run(conveyor_cmd("keys", "kubernetes-secrets", str(keys), "--release", "prod", "-n", "jobs"),
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    secrets = {s["metadata"]["name"]: s for s in yaml.safe_load_all(res.stdout)}
    assert sorted(secrets) == sorted(f"prod-conveyor-{n}" for n in (
        "dispatcher-keys", "authorized-workers", "authorized-clients", "worker-keys", "client-keys",
        "worker-keys-gpu-1"))
    files = {n: {k: base64.b64decode(v) for k, v in s["data"].items()} for n, s in secrets.items()}
    assert files["prod-conveyor-dispatcher-keys"] == {f: (keys / f).read_bytes()
                                                      for f in ("dispatcher.key", "dispatcher.key_secret")}
    assert set(files["prod-conveyor-authorized-workers"]) == {"worker.key", "gpu-1.key"}
    assert set(files["prod-conveyor-authorized-clients"]) == {"client.key", "Alice_1.key"}
    assert files["prod-conveyor-worker-keys-gpu-1"]["worker.key_secret"] == (
        keys / "hosts" / "gpu-1" / "worker.key_secret").read_bytes()
    assert set(files["prod-conveyor-client-keys"]) == {"client.key", "client.key_secret", "dispatcher.key"}
    assert all(s["metadata"]["namespace"] == "jobs" and s["type"] == "Opaque" for s in secrets.values())
    assert "Alice_1" in res.stderr and "gone" in res.stderr and res.stderr.count("note:") == 2
    if kube_validate.missing_validators() is None:
        assert [e for s in secrets.values() for e in kube_validate.validate(s, "1.30.0")] == []

    bad = subprocess.run(conveyor_cmd("keys", "kubernetes-secrets", str(keys), "--release", "Prod"),
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: bad release name") and bad.stdout == ""
    missing = subprocess.run(conveyor_cmd("keys", "kubernetes-secrets", str(tmp_path / "nope")),
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr


# --- revocation through the kubelet's symlink swap -------------------------------------------------------------


def test_a_secret_update_revokes_a_worker_on_the_running_dispatcher(tmp_path: Path) -> None:
    """The chart mounts the authorized keys as whole Secrets; the kubelet updates them by swapping `..data`."""
    keys = tmp_path / "keys"
    init_directory(keys)
    add_peer(keys, "worker", "gone")
    mounted = tmp_path / "dispatcher-keys"  # the dispatcher's /keys as the pod sees it
    mounted.mkdir(mode=0o700)
    shutil.copy2(keys / "dispatcher.key_secret", mounted / "dispatcher.key_secret")
    workers = AtomicVolume(mounted / "authorized" / "workers")
    workers.write({n: ((keys / "authorized" / "workers" / n).read_bytes(), 0o400) for n in ("worker.key", "gone.key")})
    AtomicVolume(mounted / "authorized" / "clients").write(
        {"client.key": ((keys / "authorized" / "clients" / "client.key").read_bytes(), 0o400)})
    first = workers.current()

    cluster = Cluster(tmp_path)
    try:
        cluster.start_dispatcher("--keys", str(mounted))
        stay = cluster.start_worker("threads", 1, None, "stay", "--keys", str(keys))
        gone = cluster.start_worker("threads", 1, None, "gone", "--keys", str(keys / "hosts" / "gone"))
        client = cluster.client(keys=keys)
        cluster.wait_for_workers(stay, gone)

        workers.write({"worker.key": ((keys / "authorized" / "workers" / "worker.key").read_bytes(), 0o400)})
        assert workers.current() != first and not first.exists() and not (workers.root / "gone.key").exists()
        assert cluster.workers[gone].wait(15) == 1
        assert "was revoked" in (tmp_path / "worker-gone.log").read_text()
        wait_until(lambda: [w["name"] for w in client.status()["workers"]] == [stay], 10, what="gone dropped")
        assert client.submit(pow, 2, 5).result(30) == 32
        refused = client.status()["security"]["handshakes_refused"]
        cluster.start_worker("threads", 1, None, "again", "--keys", str(keys / "hosts" / "gone"))
        wait_until(lambda: "refused this worker's key" in (tmp_path / "worker-again.log").read_text(), 20,
                   what="a new connection with the revoked key to be refused")
        status = client.status()
        assert status["security"]["handshakes_refused"] > refused and [w["name"] for w in status["workers"]] == [stay]
        assert status["security"]["authorized"] == {"workers": 1, "clients": 1} and status["security"]["revoked"] >= 1
        with Client(cluster.address, keys=keys, connect_timeout=10) as other:  # the untouched keys still work
            assert other.submit(pow, 3, 3).result(30) == 27
    finally:
        cluster.stop()


# --- 4. the pod specs under Docker: the containers' contract, not Kubernetes ------------------------------------

def test_pods_register_with_the_secrets_keys_and_serve(kube: Release) -> None:
    pods = {p.name: group for group in ("cpu", "io") for p in workers_of(kube, group)}
    with kube.client(kube.host_keys, connect_timeout=30) as client:
        workers = wait_until(lambda: len(w := registered(client)) == 3 and w, 60, what="3 workers to register")
        assert {name: w["mode"] for name, w in workers.items()} == {
            name: {"cpu": "processes", "io": "asyncio"}[g] for name, g in pods.items()}  # named after their pods
        assert client.status()["security"]["authorized"] == {"workers": 2, "clients": 1}
        every = [p for g in ("cpu", "io") for p in workers_of(kube, g)] + kube.pods[kube.dispatcher]
        wait_until(lambda: all(p.ready() and p.live() for p in every), 60, what="every pod to be ready")

        assert client.submit(pow, 2, 10).result(30) == 1024  # from outside the "cluster"
        cpu = client.options(mode="processes").submit("os:getpid")
        cpu.result(30)
        assert pods[cpu.info["worker"]] == "cpu"
        where = client.options(tags=["io"]).submit("kubetasks.jobs:where", 7)  # code from the ConfigMap
        assert where.result(30) == [7, where.info["worker"]] and pods[where.info["worker"]] == "io"

    test_pod = kube.node.run_workload(kinds(kube.objects, "Pod")[0])  # `helm test`
    wait_until(lambda: test_pod.exited() is not None, 60, what="the helm test pod to finish")
    assert (test_pod.exited(), test_pod.stdout()) == (0, "42\n"), test_pod.logs()
    kube.node.delete_pod(test_pod)

    dispatcher = kube.pods[kube.dispatcher][0]
    mode = subprocess.run(["docker", "exec", dispatcher.docker_name(), "stat", "-c", "%a %U %G",
                           "/keys/dispatcher.key_secret"], capture_output=True, text=True, timeout=30).stdout
    assert mode.split() == ["440", "root", "conveyor"]  # 0400 + the kubelet's group read for fsGroup


def test_the_keda_query_reads_metrics_the_dispatcher_serves(kube: Release) -> None:
    import urllib.request

    values = docker_values(kube.node.image)
    values["autoscaling"] = {"keda": {"enabled": True, "serverAddress": "http://prometheus:9090"}}
    scaled = kinds(kube_render.documents(kube_render.render(values)), "ScaledObject")
    with kube.client(kube.host_keys, connect_timeout=30) as client:
        wait_until(lambda: len(registered(client)) == 3, 60, what="3 workers to register")
        running = client.options(mode="processes").submit("time:sleep", 3)
        queued = client.options(mode="threads").submit("time:sleep", 0)  # no threads worker: it stays queued
        wait_until(lambda: client.status()["running"] == 1, 30, what="the job to run")

        def scrape() -> str:
            url = f"http://{kube.dispatcher_ip}:{kube.ports['metrics']}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                return str(r.read().decode())

        busy = re.compile(r'^conveyor_worker_busy_slots\{[^}]*mode="processes"\} 1\.0$', re.MULTILINE)
        waiting = re.compile(r'^conveyor_queue_depth\{mode="threads",tags=""\} 1\.0$', re.MULTILINE)
        text = wait_until(lambda: busy.search(t := scrape()) and waiting.search(t) and t, 20,
                          what="the running and the queued job in the metrics")
        client.cancel(queued)
        running.result(30)
    for obj in scaled:
        query = obj["spec"]["triggers"][0]["metadata"]["query"]
        for metric, labels in re.findall(r"(conveyor_\w+)\{([^}]*)\}", query):
            assert f"# TYPE {metric} gauge" in text
            for label in re.findall(r"(\w+)=~?\"", labels):
                assert re.search(rf"^{metric}\{{[^}}]*\b{label}=", text, re.MULTILINE), (metric, label)


def test_probes_follow_the_worker_loop_never_the_dispatcher(kube: Release) -> None:
    dispatcher = kube.pods[kube.dispatcher][0]
    cpu, io = workers_of(kube, "cpu"), workers_of(kube, "io")[0]
    wait_until(lambda: all(p.ready() for p in [dispatcher, *cpu, io]), 60, what="every pod to be ready")
    since = time.time()
    dispatcher.signal("SIGSTOP")  # a dispatcher that answers nothing
    try:
        wait_until(lambda: not dispatcher.ready() and not any(p.ready() for p in cpu), 30,
                   what="the dispatcher and the registered-readiness workers to go not ready")
        assert io.ready()  # local readiness
    finally:
        dispatcher.signal("SIGCONT")
    wait_until(lambda: dispatcher.ready() and all(p.ready() for p in cpu), 60, what="ready again")
    for pod in [*cpu, io]:  # the dispatcher's outage never failed a worker's liveness probe
        checks = [ok for at, ok, _ in pod.probers[("worker", "liveness")].history if at > since]
        assert checks and all(checks) and pod.live()

    io.signal("SIGSTOP")  # a stuck worker loop: its health file goes stale
    wait_until(lambda: not io.live() and not io.ready(), 30, what="the stuck worker to fail liveness")
    assert all(p.live() for p in cpu)
    # the kubelet kills it: a stopped process never handles SIGTERM, so SIGKILL ends it (after a grace period
    # shortened here from the pod's 20 s); then a new container, here a new pod, starts
    exited = kube.stop(io, grace_s=1)["worker"]
    assert exited.killed and exited.code == 137, exited
    fresh = kube.start("conveyor-worker-io")
    wait_until(lambda: fresh.live() and fresh.ready(), 60, what="the new io worker to be live and ready")


def test_jobs_survive_a_dispatcher_restart_on_its_claim(kube: Release) -> None:
    with kube.client(kube.host_keys, connect_timeout=30) as submitter:  # detached jobs, as `conveyor submit`
        keep = submitter.options(keep=True)
        done = keep.submit(pow, 3, 4).job_id
        slow = [keep.options(mode="processes").submit("conveyor.builtins:shell", f"sleep 2; echo {i}").job_id
                for i in range(6)]
        wait_until(lambda: None not in submitter.job_info(done, *slow), 30, what="the jobs to be accepted")
    with kube.client(kube.host_keys, connect_timeout=30, reconnect_timeout=120) as client:
        wait_until(lambda: [(j or {}).get("state") for j in client.job_info(done, slow[0])] == ["succeeded", "running"],
                   30, what="one job done, the others running or queued")
        before = client.status()["dispatcher"]["instance"]
        exited = kube.stop(kube.pods[kube.dispatcher][0])["dispatcher"]  # SIGTERM; the StatefulSet makes a new pod
        assert exited.code == 0 and not exited.killed, exited
        dispatcher = kube.start(kube.dispatcher)  # on the same claim, journal-conveyor-dispatcher-0
        assert client.result(done, timeout=60) == 81  # finished before the restart: its result was journaled
        assert [client.result(j, timeout=60)["stdout"] for j in slow] == [f"{i}\n" for i in range(6)]  # ran again
        assert client.status()["dispatcher"]["instance"] != before
        recovered = re.search(r"(\d+) finished job\(s\) restored, (\d+) unfinished job\(s\) queued", dispatcher.logs())
        assert recovered and int(recovered[1]) >= 1 and int(recovered[2]) >= 1, dispatcher.logs()[-2000:]
        wait_until(lambda: len(registered(client)) == 3 and dispatcher.ready(), 60, what="the workers to return")


def test_scaling_workers_down_under_load_loses_nothing(kube: Release) -> None:
    with kube.client(kube.host_keys, connect_timeout=30) as client:
        wait_until(lambda: len(registered(client)) == 3, 60, what="3 workers to register")
        jobs = [client.options(mode="processes").submit("conveyor.builtins:shell", f"sleep 1; echo {i}")
                for i in range(12)]
        gone = workers_of(kube, "cpu")[0]
        wait_until(lambda: registered(client).get(gone.name, {}).get("running") == 2, 30, what="a busy cpu worker")
        exited = kube.stop(gone)["worker"]  # the Deployment scaled 2 -> 1: its pod gets SIGTERM
        assert exited.code == 0 and not exited.killed and exited.seconds < 5 + 10, exited  # drained, in time
        assert [j.result(60)["stdout"] for j in jobs] == [f"{i}\n" for i in range(12)]
        assert gone.name in {j.info["worker"] for j in jobs}  # it ran jobs, and finished them before it left
        assert gone.name not in registered(client)
        kube.start("conveyor-worker-cpu")  # and back to 2
        wait_until(lambda: len(registered(client)) == 3, 60, what="the new cpu worker")


def test_revoking_a_key_through_its_secret_reaches_the_dispatcher_pod(kube: Release) -> None:
    io = workers_of(kube, "io")[0]
    with kube.client(kube.host_keys, connect_timeout=30) as client:
        wait_until(lambda: len(registered(client)) == 3, 60, what="3 workers to register")
        subprocess.run(conveyor_cmd("keys", "revoke", str(kube.keys), "worker", "io"), check=True, cwd=ROOT,
                       capture_output=True, timeout=60)
        kube.apply_secrets()  # kubectl apply: the kubelet swaps the dispatcher's authorized-workers files
        wait_until(lambda: io.exited() is not None, 30, what="the io worker to be refused")
        assert io.exited() == 1
        assert "was revoked" in io.logs()
        assert {w["mode"] for w in registered(client).values()} == {"processes"}
        assert client.options(mode="processes").submit(pow, 2, 3).result(30) == 8
