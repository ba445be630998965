"""Results: per-backend cells, the JSON document, and the rich table drawn from that document."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

BASELINE = "process_pool"
SUBJECT = "conveyor"
# Every ratio the table shows, as (subject, baseline, column title); more are in the JSON's peer_ratios.
RATIO_COLUMNS = (
    ("conveyor", "process_pool", "Conveyor/pool"),
    ("conveyor_threads", "process_pool", "threads/pool"),
    ("conveyor_pair", "conveyor", "pair/single"),
    ("conveyor", "dask", "Conveyor/dask"),
    ("conveyor", "ray", "Conveyor/Ray"),
)


@dataclass(slots=True)
class Cell:
    """One workload on one backend, over every run."""

    status: str = "pending"  # ok | partial | error | n/a | skipped
    setup: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def finish(self) -> None:
        if self.status in ("n/a", "skipped"):
            return
        if self.errors:
            self.status = "partial" if self.samples else "error"
        else:
            self.status = "ok" if self.samples else "pending"

    def medians(self) -> dict[str, float]:
        keys: dict[str, None] = {}
        for sample in self.samples:
            keys.update(dict.fromkeys(sample["values"]))
        return {
            k: statistics.median(s["values"][k] for s in self.samples if k in s["values"]) for k in keys
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "note": self.note,
            "setup": self.setup,
            "median": self.medians(),
            "samples": self.samples,
            "errors": self.errors,
        }


def ratios(workload: dict[str, Any], subject: str = SUBJECT, baseline: str = BASELINE) -> dict[str, float | None]:
    """subject/baseline of each comparable metric's medians (None where either is missing)."""
    results = workload["results"]
    out: dict[str, float | None] = {}
    mine = results.get(subject, {}).get("median", {})
    theirs = results.get(baseline, {}).get("median", {})
    for key, metric in workload["metrics"].items():
        a, b = mine.get(key), theirs.get(key)
        out[key] = a / b if metric["comparable"] and a is not None and b else None
    return out


def peer_ratios(workload: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Both Conveyor columns against every other backend: {"conveyor/dask": {metric: ratio}, ...}."""
    names = list(workload["results"])
    return {
        **{
            f"{subject}/{baseline}": ratios(workload, subject, baseline)
            for subject in ("conveyor", "conveyor_threads")
            for baseline in names
            if subject in names and not baseline.startswith("conveyor")
        },
        **({"conveyor_pair/conveyor": ratios(workload, "conveyor_pair", "conveyor")}
           if {"conveyor_pair", "conveyor"} <= set(names) else {}),
    }


def write_results(doc: dict[str, Any], out_dir: str) -> str:
    """Write <UTC timestamp>.json and latest.json atomically; returns the timestamped path."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.fromisoformat(doc["timestamp"]).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(out_dir, f"{stamp}.json")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(out_dir, f"{stamp}-{n}.json")
    text = json.dumps(doc, indent=1, sort_keys=False) + "\n"
    for target in (path, os.path.join(out_dir, "latest.json")):
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    return path


# --- the table -------------------------------------------------------------------------------


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{value:.0f}%"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s":
        return f"{value:.2f}"
    if unit == "MB/s" and value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _spread(cell: dict[str, Any], key: str) -> str:
    """min-max over runs, relative to the median, when there is more than one run."""
    values = [s["values"][key] for s in cell.get("samples", []) if key in s["values"]]
    median = cell.get("median", {}).get(key)
    if len(values) < 2 or not median:
        return ""
    half = (max(values) - min(values)) / 2 / median
    return f" \N{PLUS-MINUS SIGN}{100 * half:.0f}%"


def render(doc: dict[str, Any], console: Console) -> None:
    backends = [(name, b) for name, b in doc["backends"].items() if b["available"]]
    title = (
        f"Conveyor benchmarks ({'smoke' if doc['smoke'] else 'full'} sizes, median of {doc['runs']} "
        f"run{'s' if doc['runs'] != 1 else ''})"
    )
    m = doc["machine"]
    caption = (
        f"{m.get('cpu_model') or '?'}, {m['cpu_count']} CPUs, Python {m['python']}, "
        f"pyzmq {m['pyzmq']} / libzmq {m['libzmq']}, {m['platform']}\n"
        "ratios of medians (Conveyor: processes-mode worker, threads: threads-mode worker); "
        "\N{UPWARDS ARROW} higher is better, "
        "\N{DOWNWARDS ARROW} lower is better; \N{PLUS-MINUS SIGN} half the min-max spread over runs"
    )
    table = Table(title=title, caption=caption, show_lines=False)
    table.add_column("workload", style="bold")
    table.add_column("metric")
    for _, b in backends:
        table.add_column(b["label"], justify="right")
    available = {name for name, _ in backends}
    columns = [(a, b, title) for a, b, title in RATIO_COLUMNS if a in available and b in available]
    for _, _, title in columns:
        table.add_column(title, justify="right", style="bold")
    table.add_column("sizes", style="dim")
    for wname, w in doc["workloads"].items():
        first = True
        for key, metric in w["metrics"].items():
            arrow = "\N{UPWARDS ARROW}" if metric["higher_is_better"] else "\N{DOWNWARDS ARROW}"
            row: list[Text | str] = [wname if first else "", f"{metric['label']} ({metric['unit']}) {arrow}"]
            for bname, _ in backends:
                cell = w["results"].get(bname)
                if cell is None or cell["status"] in ("n/a", "skipped"):
                    row.append(Text("n/a", style="dim"))
                elif cell["status"] == "error":
                    row.append(Text("error", style="red"))
                else:
                    value = cell["median"].get(key)
                    text = Text(_fmt(value, metric["unit"]))
                    text.append(_spread(cell, key), style="dim")
                    if cell["status"] == "partial":
                        text.append(" (partial)", style="yellow")
                    row.append(text)
            for subject, baseline, _ in columns:
                ratio = w.get("peer_ratios", {}).get(f"{subject}/{baseline}", {}).get(key)
                if ratio is None:
                    row.append(Text("n/a", style="dim"))
                else:
                    better = ratio >= 1 if metric["higher_is_better"] else ratio <= 1
                    row.append(Text(f"{ratio:.2f}", style="green" if better else "red"))
            row.append(w.get("note", "") if first else "")
            table.add_row(*row)
            first = False
    console.print(table)
    cpus = doc["machine"].get("cpu_count") or 1
    before = (doc.get("load_average") or {}).get("before")
    if before and before[0] > 0.5 * cpus:  # at the start, before any of this benchmark's own processes
        console.print(
            f"[yellow]warning: the machine was already busy when the benchmark started (1-min load average "
            f"{before[0]:.1f} on {cpus} CPUs): expect noisy numbers[/yellow]"
        )
    for name, b in doc["backends"].items():
        if not b["available"]:
            console.print(f"[dim]{b['label']} ({name}): {b['note']}[/dim]")
    for problem in doc["problems"]:
        console.print(
            f"[red]problem[/red] {problem['workload']} on {problem['backend']} (run {problem['run']}): "
            f"{problem['error']}"
        )
