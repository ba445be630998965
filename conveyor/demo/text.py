"""Small formatting helpers for the report."""

from __future__ import annotations

import math
from typing import Any


def fmt(value: Any, digits: int = 2) -> str:
    """A number with a fixed number of decimals; anything else (or NaN) as text."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; cells are formatted with fmt unless they are already strings."""

    def cell(v: Any) -> str:
        return (v if isinstance(v, str) else fmt(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def verdict(e: dict[str, Any]) -> str:
    """yes (the measurement shows the claim), no (it did not, here), info (nothing to confirm), failed."""
    if "error" in e:
        return "failed"
    holds = e.get("holds")
    if holds is None:
        return "info"
    return "yes" if holds else "no"


def image(made: dict[str, str], name: str, alt: str) -> str:
    """A Markdown image for a plot that was made, or a note saying how to get plots."""
    if made.get(name):
        return f"![{alt}]({made[name]})\n"
    return "_(No plot: install the demo extra, `pip install 'conveyor[demo]'`, for PNG plots.)_\n"


def per_slot(value: float, unit: str, digits: int = 2) -> str:
    """A fitted per-slot cost: signed, or 'about 0' when it rounds to nothing."""
    if abs(value) < 0.5 * 10**-digits:
        return f"about 0 {unit}"
    return f"{value:+,.{digits}f} {unit}"


def busy_machine(meta: dict[str, Any]) -> bool:
    """Whether other programs kept the machine's cores busy during the run (load average above half the cores)."""
    loads = [*(meta.get("load_average_before") or []), *(meta.get("load_average_after") or [])]
    return bool(loads) and max(loads) > 0.5 * (meta.get("cpu_count") or 1)


def when(meta: dict[str, Any], at: str) -> str:
    """The ISO start time, as 'YYYY-MM-DD HH:MM UTC'."""
    return at.replace("T", " ")[:16] + " UTC" if at.endswith("+00:00") else at
