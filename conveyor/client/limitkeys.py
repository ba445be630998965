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


def call_arguments(fn: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by parameter name (positional or keyword, defaults applied, **kwargs opened);
    for a function given by name, or one without a signature, only its keyword arguments."""
    try:
        sig = inspect.signature(fn) if callable(fn) else None
    except (TypeError, ValueError):
        sig = None
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
