"""Render deploy/helm/conveyor with the real Helm engine (PyPI helm-python-sdk: Helm's Go SDK as a C library)
and write the plain manifests of deploy/kubernetes/.

    python3 -m tests.kube_render --write     # regenerate deploy/kubernetes/conveyor.yaml after a chart change

tests/test_helm.py renders the chart over VALUES_MATRIX and checks that the committed manifests equal a fresh
render. helm-python-sdk and PyYAML are test dependencies only (the k8s extra); nothing here needs a cluster.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "conveyor"
MANIFESTS = ROOT / "deploy" / "kubernetes" / "conveyor.yaml"
RELEASE = "conveyor"
NAMESPACE = "conveyor"
FULLNAME = "conveyor"  # the chart's full name for release "conveyor"

TWO_GROUPS: list[dict[str, Any]] = [
    {"name": "cpu", "mode": "processes", "concurrency": 2, "readinessProbe": {"mode": "registered"}},
    {"name": "io", "mode": "asyncio", "concurrency": 200, "tags": ["io"], "replicas": 1, "drainTimeoutSeconds": 60,
     "keysSecret": "conveyor-worker-keys-io", "code": {"configMap": "kubetasks", "package": "kubetasks"}},
]

# The values every render test covers: each a release's values, as `helm install -f` would take them.
VALUES_MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {},
    "keys": {"keys": {"dispatcherSecret": "my-dispatcher", "authorizedWorkersSecret": "my-workers",
                      "authorizedClientsSecret": "my-clients", "workerSecret": "my-worker",
                      "clientSecret": "my-client"}},
    "insecure": {"insecure": True, "workerGroups": [{"name": "default", "readinessProbe": {"mode": "registered"}}]},
    "keda": {"dispatcher": {"metrics": {"enabled": True}},
             "autoscaling": {"keda": {"enabled": True, "serverAddress": "http://prometheus-operated.monitoring:9090",
                                      "metricSelector": 'namespace="conveyor"'}},
             "workerGroups": TWO_GROUPS},
    "groups": {"workerGroups": TWO_GROUPS, "dispatcher": {"metrics": {"enabled": True},
                                                          "dashboard": {"enabled": True}}},
    "no-journal": {"dispatcher": {"journal": {"enabled": False}}, "tests": {"enabled": False}},
}


def missing_helm() -> str | None:
    """Why the chart cannot be rendered here (None: it can)."""
    try:
        import helm_python  # noqa: F401
    except ImportError:
        return "helm-python-sdk is not installed: pip install '.[k8s]'"
    return missing_yaml()


def missing_yaml() -> str | None:
    try:
        import yaml  # noqa: F401
    except ImportError:
        return "PyYAML is not installed: pip install '.[k8s]'"
    return None


def kinds(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, str]]]:
    """(object, pod spec, pod labels) of every workload and Pod."""
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet"):
            yield o, o["spec"]["template"]["spec"], o["spec"]["template"]["metadata"]["labels"]
        elif o["kind"] == "Pod":
            yield o, o["spec"], o["metadata"]["labels"]


def arg(container: dict[str, Any], flag: str) -> str | None:
    args = [*container.get("command", []), *container.get("args", [])]
    return args[args.index(flag) + 1] if flag in args else None


def render(values: dict[str, Any] | None = None, release: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included), as `helm template` renders it offline."""
    import helm_python

    with helm_python.Chart.load(CHART) as chart:
        return chart.render(values, name=release, namespace=namespace, is_install=True)


def documents(rendered: dict[str, str], tests: bool = True) -> list[dict[str, Any]]:
    """The Kubernetes objects of a render, in template order; the `helm test` hooks only with tests=True."""
    import yaml

    out = []
    for path in sorted(rendered):
        if not path.endswith(".yaml") or (not tests and "/templates/tests/" in path):
            continue
        out += [doc for doc in yaml.safe_load_all(rendered[path]) if doc]
    return out


def lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """`helm lint --strict` of the chart with these values: {"messages": [...], "errors": [...]}."""
    import helm_python

    return helm_python.lint(CHART, values, strict=True)


def plain_manifests() -> str:
    """deploy/kubernetes/conveyor.yaml: the chart's default render for release "conveyor", without hooks."""
    rendered = render()
    parts = [
        "# Conveyor on Kubernetes without Helm: deploy/helm/conveyor rendered with its default values for release\n"
        f"# {RELEASE!r} (the key Secrets: `conveyor keys kubernetes-secrets keys/ | kubectl apply -n NS -f -`).\n"
        "# Generated by `python3 -m tests.kube_render --write`; tests/test_helm.py checks it equals a fresh render.\n"
        "# Edit the chart, not this file. Apply with: kubectl apply -n NS -f deploy/kubernetes/conveyor.yaml\n"
    ]
    for path in sorted(rendered):
        if path.endswith(".yaml") and "/templates/tests/" not in path and rendered[path].strip():
            name = path.split("/templates/", 1)[1]
            text = rendered[path].strip("\n")
            text = text[4:] if text.startswith("---\n") else text
            parts.append(f"---\n# Source: {name}\n{text}\n")
    return "".join(parts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {MANIFESTS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    text = plain_manifests()
    if args.write:
        MANIFESTS.write_text(text)
        print(f"wrote {MANIFESTS.relative_to(ROOT)}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
