"""`conveyor keys init|add-worker|add-client|list|revoke|kubernetes-secrets`: create and authorize CurveZMQ keys.

The directory layout is described in `conveyor/security/keys.py`; docs/security.md says which file goes to
which host. Errors end as one `error: ...` line (KeysError is a ConveyorError, printed by cli.main).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from conveyor.cli.common import EXIT_USAGE, CliError, new_app
from conveyor.errors import KeysError
from conveyor.security import keys as keyfiles

app = new_app("keys", "Create and authorize CurveZMQ keys (docs/security.md).")

DirArg = Annotated[Path, typer.Argument(help="The key directory.")]
NameArg = Annotated[str, typer.Argument(help="A name for the key: letters, digits, '.', '_', '-'.")]
PublicKeyOpt = Annotated[
    Path | None,
    typer.Option("--public-key", help="Authorize this existing public key file instead of making a new pair."),
]


def _show(paths: list[Path]) -> None:
    for path in paths:
        print(f"  {path}")


@app.command()
def init(directory: DirArg) -> None:
    """Create DIR with a dispatcher, a worker and a client key pair (the last two authorized)."""
    created = keyfiles.init_directory(directory)
    print(f"created {directory}:")
    _show(created)
    print(
        f"On this host: `conveyor dispatcher --keys {directory}`, `conveyor worker --keys {directory}`, "
        f"clients `--keys {directory}` (or export {keyfiles.ENV_KEYS}={directory}).\n"
        f"For other hosts: `conveyor keys add-worker {directory} NAME` / `add-client {directory} NAME`, "
        f"then copy {directory}/hosts/NAME/ to that host."
    )


def _add(directory: Path, role: str, name: str, public_key: Path | None) -> None:
    created = keyfiles.add_peer(directory, role, name, public_key)
    if public_key is not None:
        print(f"authorized {public_key} as {role} {name!r}: {created[0]}")
        return
    host = directory / keyfiles.HOSTS / name
    print(f"authorized a new {role} key {name!r}:")
    _show(created)
    print(f"Copy {host}/ to that host (keep {role}.key_secret private) and use `--keys DIR` there.")


@app.command("add-worker")
def add_worker(directory: DirArg, name: NameArg, public_key: PublicKeyOpt = None) -> None:
    """Authorize one more worker key: a new pair in DIR/hosts/NAME/, or an existing --public-key."""
    _add(directory, "worker", name, public_key)


@app.command("add-client")
def add_client(directory: DirArg, name: NameArg, public_key: PublicKeyOpt = None) -> None:
    """Authorize one more client key: a new pair in DIR/hosts/NAME/, or an existing --public-key."""
    _add(directory, "client", name, public_key)


@app.command("list")
def list_keys(directory: DirArg) -> None:
    """Show the authorized worker and client keys."""
    rows = keyfiles.list_authorized(directory)
    if not rows:
        print(f"no authorized keys in {directory / keyfiles.AUTHORIZED}")
    for role, name, key in rows:
        print(f"{role:7} {name:24} {key}")


@app.command()
def revoke(
    directory: DirArg,
    role: Annotated[str, typer.Argument(help="worker or client.")],
    name: NameArg,
) -> None:
    """Stop accepting a key: new connections at once, live ones within a heartbeat (docs/security.md)."""
    if role not in keyfiles.ROLES:
        raise KeysError(f"role must be worker or client, not {role!r}")
    path = keyfiles.revoke(directory, role, name)
    print(f"revoked {role} {name!r} (removed {path})")


@app.command("kubernetes-secrets")
def kubernetes_secrets(
    directory: DirArg,
    release: Annotated[
        str, typer.Option("--release", help="The Helm release the Secrets are for: their names follow it.")
    ] = "conveyor",
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", help="Put the Secrets in this namespace.")
    ] = None,
) -> None:
    """Print Kubernetes Secret manifests (YAML) for DIR's keys, for deploy/helm/conveyor (docs/kubernetes.md).

    Apply them with `kubectl apply -f -`; after `conveyor keys revoke` or `add-worker`, apply them again.
    """
    from conveyor.security.kubernetes import kubernetes_secrets as render

    try:
        rendered = render(directory, release=release, namespace=namespace)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    sys.stdout.write(rendered.yaml())
    for note in rendered.notes:
        print(f"note: {note}", file=sys.stderr)
