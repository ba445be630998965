"""Template limit keys filled in from a call's arguments (`tenant:{tenant_id}` -> `tenant:7`; docs/scheduling.md)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from conveyor.protocol.limitkeys import fill, is_template


def filled_limits(
    options: Mapping[str, Any], fn: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The options with their template limit keys filled in from this call; ValueError if a field is missing."""
    keys = options.get("limits") or ()
    if not any(is_template(k) for k in keys):
        return dict(options)
    values = call_arguments(fn, args, kwargs)
    return {**options, "limits": [fill(k, values) if is_template(k) else k for k in keys]}


_SIGNATURES: dict[Any, inspect.Signature | None] = {}  # per function: inspect.signature is most of the cost


def _signature(fn: Callable[..., Any] | str) -> inspect.Signature | None:
    if not callable(fn):
        return None
    try:
        return _SIGNATURES[fn]
    except (KeyError, TypeError):  # not seen yet, or not hashable
        pass
    try:
        sig: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    try:
        if len(_SIGNATURES) >= 1024:
            _SIGNATURES.clear()
        _SIGNATURES[fn] = sig
    except TypeError:
        pass
    return sig


def call_arguments(fn: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by parameter name (positional or keyword, defaults applied, **kwargs opened);
    for a function given by name, or one without a signature, only its keyword arguments."""
    sig = _signature(fn)
    if sig is None:
        return dict(kwargs)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"cannot fill in limit keys: the arguments do not fit {getattr(fn, '__qualname__', fn)}: "
                         f"{exc}") from None
    bound.apply_defaults()
    values = dict(bound.arguments)
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            values.update(values.pop(p.name, {}))
    return values
