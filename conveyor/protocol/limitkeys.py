"""Limit key grammar, shared by the client (which expands templates) and the dispatcher (which matches them).

A key is letters, digits and `_ . : - /`, at most 200 characters. A *template* also holds fields in braces,
`tenant:{tenant_id}`: the client fills each field from the call's arguments (`tenant:7`), and the
dispatcher applies the template's rule to each filled-in key on its own (docs/scheduling.md).
"""

from __future__ import annotations

import re

KEY_RE = re.compile(r"^[A-Za-z0-9_.:\-/{}]{1,200}$")  # a key or a template, as LIMITS and SUBMIT carry it
VALUE_RE = re.compile(r"^[A-Za-z0-9_.:\-/]+$")  # what a field may be filled with
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def is_template(key: str) -> bool:
    return "{" in key or "}" in key


def template_fields(key: str) -> tuple[str, ...]:
    """The field names of a template, in order; ValueError if its braces are not `{identifier}` pairs."""
    names = tuple(_FIELD.findall(key))
    if not names or is_template(_FIELD.sub("", key)):
        raise ValueError(f"bad limit key template {key!r}: fields are {{name}} with a Python identifier inside")
    return names


def template_pattern(key: str) -> re.Pattern[str]:
    """A regex matching every key this template expands to (the caller checked it with template_fields)."""
    parts = _FIELD.split(key)  # literal, name, literal, name, ..., literal
    body = "".join(re.escape(p) if i % 2 == 0 else "[A-Za-z0-9_.:\\-/]+" for i, p in enumerate(parts))
    return re.compile(f"^{body}$")


def fill(key: str, values: dict[str, object]) -> str:
    """The template with its fields filled from `values`; ValueError naming the field that is missing or bad."""
    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise ValueError(f"limit key {key!r} needs the argument {name!r}, which this call does not give")
        text = str(values[name])
        if not VALUE_RE.match(text):
            raise ValueError(f"limit key {key!r}: {name}={text!r} may hold only letters, digits and _ . : - /")
        return text

    out = _FIELD.sub(one, key)
    if len(out) > 200:
        raise ValueError(f"limit key {out[:40]!r}... is longer than 200 characters")
    return out
