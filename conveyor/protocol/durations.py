"""Durations as people write them: '90', '90s', '10m', '2h', '1d', '1h30m'. Pure; used by the CLI,
the client and the dashboard."""

from __future__ import annotations

import re

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '1d', '1h30m' -> seconds."""
    text = text.strip().lower()
    if not text:
        raise ValueError("empty duration")
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"bad duration {text!r}: use e.g. 30s, 10m, 2h, 1d")
    return sum(float(n) * _UNITS[u] for n, u in parts)
