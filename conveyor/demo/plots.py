"""PNG plots of the demo's results (matplotlib, from the optional `conveyor[demo]` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"threads": "#d62728", "processes": "#1f77b4", "asyncio": "#2ca02c", "interpreters": "#ff7f0e",
          "ideal": "#555555"}
MARKERS = {"threads": "s", "processes": "o", "asyncio": "^", "interpreters": "D"}
ORDER = ("processes", "interpreters", "threads", "asyncio")  # the order of the curves and their legend


def _sweep_modes(data: dict[str, Any]) -> list[str]:
    present = {r["mode"] for r in data["runs"]}
    return [m for m in ORDER if m in present]


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 10})
    return plt


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name)
    _plt().close(fig)
    return name


def _ideal(ax: Any, xs: list[int], cores: int, label: str | None = None) -> None:
    ax.plot(
        xs, [min(x, cores) for x in xs], linestyle="--", color=COLORS["ideal"], linewidth=1.5,
        label=label or f"ideal: one task per core, at most {cores} cores",
    )
    ax.axhline(1.0, color="#999999", linewidth=0.8)


def _log2_axis(ax: Any, xs: list[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel(label)


def counters(result: dict[str, Any], out: Path) -> str:
    plt = _plt()
    values = dict(sorted(result["final_value_per_process"].items()))
    labels = [f"child\npid {k.split(':')[-1]}" for k in values] + ["this program\n(submitter)"]
    heights = [*values.values(), result["this_program_value"]]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bars = ax.bar(labels, heights, color=[COLORS["processes"]] * len(values) + ["#999999"])
    ax.bar_label(bars)
    ax.axhline(result["tasks"], linestyle="--", color=COLORS["ideal"], label=f"increments made: {result['tasks']}")
    ax.set_ylabel("value of the counter in that process")
    ax.set_title("1. One module-global counter, incremented by every task:\neach process sees only its own copy")
    ax.set_ylim(0, result["tasks"] * 1.4)
    ax.legend(loc="upper right")
    return _save(fig, out, "1_process_copies.png")


def race(result: dict[str, Any], out: Path) -> str:
    plt = _plt()
    labels = ["expected", "no lock", "with a lock"]
    heights = [result["expected"], result["unlocked_result"], result["locked_result"]]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bars = ax.bar(labels, heights, color=["#999999", COLORS["threads"], COLORS["processes"]])
    ax.bar_label(bars, labels=[f"{h:,}" for h in heights])
    ax.set_ylabel("final value of the shared variable")
    ax.set_ylim(0, result["expected"] * 1.15)
    ax.set_title(
        f"2. {result['threads']} threads each add {result['increments_per_task']:,} to one shared variable"
    )
    return _save(fig, out, "2_race.png")


def cpu_scaling(data: dict[str, Any], cores: int, gil: bool, out: Path) -> str:
    plt = _plt()
    xs = [int(x) for x in data["levels"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _ideal(ax, xs, cores)
    for mode in _sweep_modes(data):
        pts = sorted((r["concurrency"], r["cpu"]["speedup"]) for r in data["runs"] if r["mode"] == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[mode], color=COLORS[mode],
                linewidth=2, label=f"{mode} mode")
    _log2_axis(ax, xs, "concurrency (tasks running at once on one worker)")
    ax.set_ylabel("speedup vs concurrency 1 (higher is faster)")
    ax.set_ylim(0, max(cores, 1) * 1.25 + 0.2)
    gil_note = "GIL enabled" if gil else "GIL disabled"
    ax.set_title(f"5. Pure-Python CPU-bound work on {cores} cores ({gil_note})")
    ax.legend(loc="upper left")
    return _save(fig, out, "5_cpu_scaling.png")


def sha_scaling(data: dict[str, Any], cores: int, out: Path) -> str:
    plt = _plt()
    xs = [int(x) for x in data["levels"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _ideal(ax, xs, cores)
    series = [
        ("threads", "sha", "threads mode: hashlib.sha256 (releases the GIL)", "-"),
        ("processes", "sha", "processes mode: hashlib.sha256", "-"),
        ("threads", "cpu", "threads mode: pure Python (holds the GIL), for comparison", ":"),
    ]
    for mode, workload, label, style in series:
        pts = sorted((r["concurrency"], r[workload]["speedup"]) for r in data["runs"]
                     if r["mode"] == mode and workload in r)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[mode], color=COLORS[mode],
                linestyle=style, linewidth=2, label=label, alpha=0.6 if style == ":" else 1.0)
    _log2_axis(ax, xs, "concurrency (tasks running at once on one worker)")
    ax.set_ylabel("speedup vs concurrency 1 (higher is faster)")
    ax.set_ylim(0, max(cores, 1) * 1.25 + 0.2)
    ax.set_title(f"5. Work that releases the GIL: threads scale too ({cores} cores)")
    ax.legend(loc="upper left", fontsize=8.5)
    return _save(fig, out, "5_gil_released_scaling.png")


def cores_busy(data: dict[str, Any], cores: int, out: Path) -> str:
    plt = _plt()
    xs = [int(x) for x in data["levels"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, [min(x, cores) for x in xs], linestyle="--", color=COLORS["ideal"],
            label=f"ideal: every task on its own core, at most {cores}")
    for mode in _sweep_modes(data):
        pts = sorted((r["concurrency"], r["cpu"]["cores_busy"]) for r in data["runs"] if r["mode"] == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[mode], color=COLORS[mode],
                linewidth=2, label=f"{mode} mode")
    _log2_axis(ax, xs, "concurrency (tasks running at once on one worker)")
    ax.set_ylabel("cores busy (CPU seconds / wall seconds)")
    ax.set_ylim(0, max(cores, 1) * 1.25 + 0.2)
    ax.set_title("3-4. How many cores the worker used during the CPU-bound batch")
    ax.legend(loc="upper left")
    return _save(fig, out, "4_cores_busy.png")


def hosts(result: dict[str, Any], out: Path) -> str:
    plt = _plt()
    runs = result["runs"]
    xs = [r["workers"] for r in runs]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(xs, xs, linestyle=":", color=COLORS["ideal"], label="ideal with one host per worker")
    cores = result["cores"]
    ax.plot(xs, [min(x, cores) for x in xs], linestyle="--", color=COLORS["ideal"],
            label=f"ideal on this machine ({cores} cores)")
    ax.plot(xs, [r["speedup"] for r in runs], marker="s", color=COLORS["threads"], linewidth=2,
            label="measured: threads-mode workers")
    ax.set_xticks(xs)
    ax.set_xlabel("worker processes (stand-ins for hosts, on loopback)")
    ax.set_ylabel("speedup vs one worker")
    ax.set_ylim(0, max(xs) * 1.15)
    ax.set_title("6. The same CPU-bound batch on 1, 2 and 3 worker processes")
    ax.legend(loc="upper left")
    return _save(fig, out, "6_hosts.png")


def _idle_rss(point: dict[str, Any]) -> float:
    return float(point["idle"]["rss_mib"])


def _startup(point: dict[str, Any]) -> float:
    return float(point["worker_s"])


def cost(result: dict[str, Any], out: Path) -> str:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.4))
    top = max(p["concurrency"] for v in result["per_mode"].values() for p in v["points"])
    ticks = [10**i for i in range(len(str(int(top))))]
    for mode, v in result["per_mode"].items():
        sweep = sorted((p for p in v["points"] if p["source"] == "sweep"), key=lambda p: p["concurrency"])
        other = sorted((p for p in v["points"] if p["source"] != "sweep"), key=lambda p: p["concurrency"])
        for ax, value in ((left, _idle_rss), (right, _startup)):
            ax.plot([p["concurrency"] for p in sweep], [value(p) for p in sweep], marker=MARKERS[mode],
                    color=COLORS[mode], linewidth=2, label=mode)
            if other and sweep:
                ends = [sweep[-1], *other]
                ax.plot([p["concurrency"] for p in ends], [value(p) for p in ends], linestyle=":",
                        color=COLORS[mode], linewidth=1.2)
                ax.plot([p["concurrency"] for p in other], [value(p) for p in other], marker=MARKERS[mode],
                        linestyle="none", markersize=8, markerfacecolor="white", color=COLORS[mode])
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:,}" for t in ticks])
        ax.set_xlabel("concurrency (slots) of the worker, log scale")
        ax.legend(loc="best", title="hollow: experiment 9's workers", title_fontsize=8)
    left.set_ylabel("resident memory, MiB (worker + children)")
    left.set_title("7. Memory of an idle worker")
    left.set_ylim(bottom=0)
    right.set_ylabel("seconds from start to first result")
    right.set_title("7. Start-up time of a worker (one sample each)")
    right.set_ylim(bottom=0)
    return _save(fig, out, "7_cost.png")


def waiting(result: dict[str, Any], out: Path) -> str:
    plt = _plt()
    runs = result["runs"]
    labels = [f"{r['mode']}\n{r['tasks']:,} tasks\n{r['concurrency']:,} at once" for r in runs]
    colors = [COLORS[r["mode"]] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    panels = [
        ("wall seconds per 1,000 tasks", [r["per_1000_tasks_s"] for r in runs], "{:.2f}"),
        ("threads used (peak)", [r["peak_threads"] for r in runs], "{:,}"),
        ("memory, MiB (peak RSS)", [r["peak_rss_mib"] for r in runs], "{:.0f}"),
    ]
    for ax, (title, values, fmt) in zip(axes, panels, strict=True):
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values])
        ax.set_title(title)
        ax.set_ylim(0, max(values) * 1.2 if max(values) else 1)
        ax.tick_params(axis="x", labelsize=8)
    wait_ms = round(runs[0]["wait_s"] * 1000)
    fig.suptitle(f"9. Tasks that each wait {wait_ms} ms: one event loop vs threads vs processes")
    return _save(fig, out, "9_waiting.png")


def interpreters(result: dict[str, Any], out: Path) -> str:
    """Experiment 11: speed-up and idle memory of threads, processes and interpreters mode, side by side."""
    plt = _plt()
    modes = list(result["by_mode"])
    c = result["concurrency"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    speed = [result["by_mode"][m]["speedup"] or 0.0 for m in modes]
    others = [result["by_mode"][m].get("other_cores_busy") or 0.0 for m in modes]
    rss = [result["by_mode"][m]["idle_rss_mib"] or 0.0 for m in modes]
    panels = [
        (left, speed, [f"{v:.2f}x\n(busy elsewhere: {o:.2f} cores)" for v, o in zip(speed, others, strict=True)],
         f"CPU-bound speed-up at concurrency {c}", "speedup vs concurrency 1 (higher is faster)"),
        (right, rss, [f"{v:.0f} MiB" for v in rss], f"Idle memory of a worker x{c}",
         "resident memory, MiB (worker + children)"),
    ]
    for ax, values, labels, title, ylabel in panels:
        bars = ax.bar([f"{m} mode" for m in modes], values, color=[COLORS[m] for m in modes])
        ax.bar_label(bars, labels=labels, fontsize=9)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(values) * 1.25 if max(values) else 1)
    left.axhline(1.0, color="#999999", linewidth=0.8)
    gil = "GIL enabled" if result["gil_enabled"] else "GIL disabled"
    fig.suptitle(f"11. One subinterpreter per slot, each with its own GIL (Python {result['python']}, {gil})")
    return _save(fig, out, "11_interpreters.png")
