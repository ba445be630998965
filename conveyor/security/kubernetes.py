"""Kubernetes Secret manifests from a key directory (`conveyor keys kubernetes-secrets DIR`).

Helm cannot make Curve25519 keys, so the keys are made once with `conveyor keys init DIR` and turned
into Secrets here; the chart in deploy/helm/conveyor/ mounts them (docs/kubernetes.md). Secret keys
cannot contain `/`, so the authorized public keys get Secrets of their own, mounted whole as the
dispatcher's `authorized/workers/` and `authorized/clients/`. Revoking a key is then an update of one
Secret: the kubelet swaps the volume's files and the dispatcher's key rescan sees them go.

    <prefix>-dispatcher-keys          dispatcher.key_secret, dispatcher.key    the dispatcher
    <prefix>-authorized-workers       NAME.key for each authorized/workers/NAME.key
    <prefix>-authorized-clients       NAME.key for each authorized/clients/NAME.key
    <prefix>-worker-keys              worker.key_secret, worker.key, dispatcher.key    the workers
    <prefix>-client-keys              client.key_secret, client.key, dispatcher.key    clients (helm test)
    <prefix>-worker-keys-NAME         hosts/NAME/'s worker pair, while its key is authorized
    <prefix>-client-keys-NAME         hosts/NAME/'s client pair, likewise

<prefix> is the chart's full name for the release: the release name if it contains "conveyor", else
RELEASE-conveyor. The output is YAML made here (no YAML library): values are JSON strings, which
YAML reads as they are. Pure functions: nothing here touches the cluster.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from conveyor.errors import KeysError
from conveyor.security.keys import (
    AUTHORIZED,
    HOSTS,
    PUBLIC_SUFFIX,
    ROLES,
    SECRET_SUFFIX,
    authorized_dir,
    read_key_pair,
    read_public_key,
)

CHART_NAME = "conveyor"
DEFAULT_RELEASE = "conveyor"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")  # what a key of a Secret's data may be
RELEASE_MAX = 53  # Helm's limit on release names
NAMESPACE_MAX = 63
SECRET_NAME_MAX = 253


@dataclass(frozen=True, slots=True)
class SecretManifest:
    name: str
    component: str  # what the Secret is for: the app.kubernetes.io/component label
    data: dict[str, bytes]


@dataclass(slots=True)
class Rendered:
    """The Secrets made from a key directory, and notes on what was left out (for stderr)."""

    secrets: list[SecretManifest]
    notes: list[str] = field(default_factory=list)
    release: str = DEFAULT_RELEASE
    namespace: str | None = None

    def yaml(self) -> str:
        return "".join(_document(s, self.release, self.namespace) for s in self.secrets)


def check_dns_label(value: str, what: str, limit: int) -> str:
    """`value` if it is a DNS-1123 label of at most `limit` characters (Kubernetes names), else ValueError."""
    if len(value) > limit or not _DNS_LABEL.match(value):
        raise ValueError(
            f"bad {what} {value!r}: use lowercase letters, digits and '-', starting and ending with a letter "
            f"or digit (at most {limit})"
        )
    return value


def fullname(release: str) -> str:
    """The chart's `conveyor.fullname` for a release (without fullnameOverride): the Secrets' prefix."""
    name = release if CHART_NAME in release else f"{release}-{CHART_NAME}"
    return name[:63].rstrip("-")


def kubernetes_secrets(
    directory: str | Path, release: str = DEFAULT_RELEASE, namespace: str | None = None
) -> Rendered:
    """The Secrets for the key directory DIR made by `conveyor keys init DIR` (see the module docstring).

    Raises ValueError for a bad release or namespace name, KeysError for a directory that is not a
    dispatcher's key directory or holds a malformed key.
    """
    check_dns_label(release, "release name", RELEASE_MAX)
    if namespace is not None:
        check_dns_label(namespace, "namespace", NAMESPACE_MAX)
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise KeysError(f"key directory {root} not found (create one with `conveyor keys init {root}`)")
    prefix = fullname(release)
    dispatcher_secret = root / f"dispatcher{SECRET_SUFFIX}"
    if not dispatcher_secret.exists():
        raise KeysError(f"{dispatcher_secret} not found: {root} is not a dispatcher's key directory "
                        "(create one with `conveyor keys init DIR`)")
    dispatcher_public, _ = read_key_pair(dispatcher_secret)
    dispatcher_cert = _public_cert(root / f"dispatcher{PUBLIC_SUFFIX}", dispatcher_public)
    out = Rendered([], release=release, namespace=namespace)
    out.secrets.append(SecretManifest(f"{prefix}-dispatcher-keys", "dispatcher", {
        dispatcher_secret.name: dispatcher_secret.read_bytes(),
        f"dispatcher{PUBLIC_SUFFIX}": dispatcher_cert,
    }))
    authorized: dict[str, set[bytes]] = {}
    for role in ROLES:
        folder = authorized_dir(root, role)
        files = []
        for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")) if folder.is_dir() else []:
            if _SECRET_KEY.match(path.name):
                files.append(path)
            else:
                out.notes.append(f"{path}: {path.name!r} cannot be a key of a Secret: left out (rename it)")
        authorized[role] = {read_public_key(path) for path in files}
        out.secrets.append(SecretManifest(
            f"{prefix}-authorized-{role}s", "dispatcher", {path.name: path.read_bytes() for path in files}
        ))
        if not files:
            out.notes.append(f"{folder} holds no keys: no {role} can connect")
    for role in ROLES:
        pair = _peer_data(root, role, dispatcher_cert, authorized[role])
        if isinstance(pair, str):
            out.notes.append(pair)
        else:
            out.secrets.append(SecretManifest(f"{prefix}-{role}-keys", role, pair))
    hosts = root / HOSTS
    for host in sorted(p for p in hosts.iterdir() if p.is_dir()) if hosts.is_dir() else []:
        for role in ROLES:
            if not (host / f"{role}{SECRET_SUFFIX}").exists():
                continue
            name = f"{prefix}-{role}-keys-{host.name}"
            if not _DNS_LABEL.match(host.name) or len(name) > SECRET_NAME_MAX:
                out.notes.append(f"{host}: {host.name!r} cannot be part of a Kubernetes name (lowercase letters, "
                                 "digits and '-'): no Secret for it")
                continue
            pair = _peer_data(host, role, dispatcher_cert, authorized[role])
            if isinstance(pair, str):
                out.notes.append(pair)
            else:
                out.secrets.append(SecretManifest(name, role, pair))
    return out


def _public_cert(path: Path, expected: bytes) -> bytes:
    """The public key file at `path`, checked against the key pair it belongs to."""
    if read_public_key(path) != expected:
        raise KeysError(f"{path} does not hold the public key of {path.name[: -len(PUBLIC_SUFFIX)]}{SECRET_SUFFIX}")
    return path.read_bytes()


def _peer_data(folder: Path, role: str, dispatcher_cert: bytes, authorized: set[bytes]) -> dict[str, bytes] | str:
    """A worker's or client's Secret data from FOLDER, or a note saying why there is none."""
    secret_file = folder / f"{role}{SECRET_SUFFIX}"
    if not secret_file.exists():
        return f"{secret_file} not found: no {role} Secret"
    public, _ = read_key_pair(secret_file)
    if public not in authorized:
        return f"{secret_file}: its key is not in {AUTHORIZED}/{role}s/ (revoked?): no Secret for it"
    public_file = folder / f"{role}{PUBLIC_SUFFIX}"
    data = {secret_file.name: secret_file.read_bytes(), f"dispatcher{PUBLIC_SUFFIX}": dispatcher_cert}
    if public_file.exists():
        data[public_file.name] = _public_cert(public_file, public)
    return data


def _document(secret: SecretManifest, release: str, namespace: str | None) -> str:
    q = json.dumps
    lines = [
        "---",
        "apiVersion: v1",
        "kind: Secret",
        "metadata:",
        f"  name: {q(secret.name)}",
        *([f"  namespace: {q(namespace)}"] if namespace is not None else []),
        "  labels:",
        f"    app.kubernetes.io/name: {q(CHART_NAME)}",
        f"    app.kubernetes.io/instance: {q(release)}",
        f"    app.kubernetes.io/component: {q(secret.component)}",
        "type: Opaque",
    ]
    if secret.data:
        lines.append("data:")
        lines += [f"  {q(key)}: {q(base64.b64encode(value).decode('ascii'))}"
                  for key, value in sorted(secret.data.items())]
    else:
        lines.append("data: {}")
    return "\n".join(lines) + "\n"
