"""Schema checks of rendered Kubernetes objects, offline.

- Built-in kinds: PyPI kubernetes-validate, strict (unknown fields are errors, as `kubectl --validate=strict`
  makes them), against the OpenAPI schemas it ships for every Kubernetes version from 1.30 on.
- KEDA ScaledObjects: the openAPIV3Schema of KEDA's own CRD (tests/kube_keda_scaledobject.schema.json, KEDA
  v2.20.2), made strict the way an API server treats a structural schema: an object with `properties` and no
  `x-kubernetes-preserve-unknown-fields` takes no other field. The CRD's one CEL rule (min <= max replicas) is
  checked by hand, its metadata against Kubernetes' ObjectMeta.

Neither is an API server: admission, defaulting and cross-object rules are not checked (docs/kubernetes.md).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

KEDA_SCHEMA = Path(__file__).resolve().parent / "kube_keda_scaledobject.schema.json"
FIRST_VERSION = (1, 30)


def missing_validators() -> str | None:
    try:
        import jsonschema  # noqa: F401
        import kubernetes_validate  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed: pip install kubernetes-validate (the k8s extra)"
    return None


@functools.cache
def kubernetes_versions() -> tuple[str, ...]:
    """Every version kubernetes-validate has schemas for, from 1.30 on (e.g. 1.30.0 ... 1.37.0)."""
    from kubernetes_validate import utils

    _patch_schema_cache()
    versions = {v for v in utils.all_versions() if tuple(int(p) for p in v.split(".")[:2]) >= FIRST_VERSION}
    return tuple(sorted(versions, key=lambda v: tuple(int(p) for p in v.split("."))))


def _patch_schema_cache() -> None:
    # kubernetes-validate re-reads a 2 MB definitions file for every object it validates; keep what it read.
    from kubernetes_validate import utils

    if not hasattr(utils.schema_contents, "cache_info"):
        utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)


def validate_builtin(obj: dict[str, Any], version: str) -> str | None:
    """None if `obj` is valid for Kubernetes `version` (strict), else the error."""
    from kubernetes_validate import utils

    _patch_schema_cache()
    try:
        utils.validate(obj, version, strict=True)
    except utils.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        return f"{obj['kind']}/{obj['metadata']['name']} at {path or '.'}: {exc.message} (Kubernetes {version})"
    except utils.SchemaNotFoundError as exc:
        return str(exc.message)
    return None


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _keda_validator() -> Any:
    import jsonschema

    schema = _strict(json.loads(KEDA_SCHEMA.read_text()))
    schema.pop("$comment", None)
    return jsonschema.Draft7Validator(schema)


@functools.cache
def _object_meta_validator(version: str) -> Any:
    """ObjectMeta of Kubernetes `version`, from kubernetes-validate's strict definitions."""
    import jsonschema
    from kubernetes_validate import utils

    _patch_schema_cache()
    definitions = utils.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    defs = definitions["$defs"]
    meta = copy.deepcopy(defs["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"])
    return jsonschema.Draft202012Validator({**meta, "$defs": defs})


def validate_scaled_object(obj: dict[str, Any], version: str) -> list[str]:
    """Errors of a keda.sh/v1alpha1 ScaledObject: the CRD's schema, its CEL rule, and ObjectMeta."""
    errors = [f"ScaledObject at {'/'.join(str(p) for p in e.path) or '.'}: {e.message}"
              for e in _keda_validator().iter_errors(obj)]
    spec = obj.get("spec", {})
    if "minReplicaCount" in spec and spec["minReplicaCount"] > spec.get("maxReplicaCount", 100):
        errors.append("ScaledObject: minReplicaCount must be less than or equal to maxReplicaCount (the CRD's rule)")
    errors += [f"ScaledObject metadata: {e.message}" for e in _object_meta_validator(version).iter_errors(
        obj.get("metadata", {}))]
    return errors


def validate(obj: dict[str, Any], version: str) -> list[str]:
    """Errors of any rendered object for Kubernetes `version` ([] if valid)."""
    if obj.get("apiVersion") == "keda.sh/v1alpha1" and obj.get("kind") == "ScaledObject":
        return validate_scaled_object(obj, version)
    error = validate_builtin(obj, version)
    return [] if error is None else [error]
