"""`conveyor graph JOB_ID`: the jobs connected to one by dependencies, each with its state.

    conveyor graph JOB_ID            a text tree: from each root (a job without parents) down its dependants
    conveyor graph JOB_ID --dot      Graphviz: `conveyor graph J --dot | dot -Tsvg > graph.svg`
    conveyor graph JOB_ID --json     {"nodes": [...], "edges": [[parent, child], ...]}

The graph is what the dispatcher still holds: a finished job whose result was delivered and not kept
is forgotten, and shows as `forgotten` where a job still names it.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from conveyor.cli.common import EXIT_USAGE, CliError, DispatcherOpt, JsonOpt, KeysOpt, connect, dump
from conveyor.protocol import failures as perr

ASK_AT_ONCE = 500  # ids per JOB_INFO request
_COLOURS = {
    "succeeded": "palegreen", "failed": "salmon", "cancelled": "lightgrey", "expired": "lightgrey",
    "running": "lightblue", "waiting": "lightyellow", "forgotten": "white",
}


def graph_command(
    job_id: Annotated[str, typer.Argument(help="A job of the graph (any one).")],
    dot: Annotated[bool, typer.Option("--dot", help="Print Graphviz dot instead of a text tree.")] = False,
    limit: Annotated[int, typer.Option(help="Show at most this many jobs.")] = 1000,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the jobs connected to JOB_ID by dependencies, each with its state."""
    if limit < 1:
        raise CliError("--limit must be at least 1", EXIT_USAGE)
    with connect(dispatcher, keys) as client:
        nodes, truncated = collect(lambda ids: client.job_info(*ids), job_id, limit)
    if nodes.get(job_id) is None:
        raise CliError(f"no job {job_id} (never submitted, or forgotten)")
    edges = sorted({(p, n["id"]) for n in nodes.values() if n for p in n.get("parents", ())})
    if as_json:
        print(dump({"nodes": [n or {"id": i, "state": "forgotten"} for i, n in nodes.items()],
                    "edges": [list(e) for e in edges], "truncated": truncated}))
    elif dot:
        print(to_dot(nodes, edges, job_id))
    else:
        print(to_text(nodes, job_id))
        if truncated:
            print(f"... more than {limit} jobs: shown the first {limit} (--limit)")


def collect(ask: Any, start: str, limit: int) -> tuple[dict[str, dict[str, Any] | None], bool]:
    """Every job reachable from `start` through parents and children, breadth first, up to `limit`."""
    nodes: dict[str, dict[str, Any] | None] = {}
    frontier = [start]
    while frontier and len(nodes) < limit:
        batch = frontier[: min(ASK_AT_ONCE, limit - len(nodes))]
        frontier = frontier[len(batch):]
        for job_id, view in zip(batch, ask(batch), strict=True):
            nodes[job_id] = view
            for other in (*(view or {}).get("parents", ()), *(view or {}).get("children", ())):
                if other not in nodes and other not in frontier and other not in batch:
                    frontier.append(other)
    return nodes, bool(frontier)


def _label(job_id: str, view: dict[str, Any] | None) -> str:
    if view is None:
        return f"{job_id} forgotten"
    text = f"{job_id} {view.get('fn', '?')} {view.get('state', '?')}"
    if view.get("state") == "waiting" and view.get("waiting_for"):
        text += f" (for {view['waiting_for']})"
    error = view.get("error") or {}
    if error.get("kind") in (perr.DEPENDENCY_FAILED, perr.DEPENDENCY_CANCELLED):
        text += f": blamed on {error.get('root')} ({error.get('root_fn')})"
    elif error:
        text += f": {perr.describe(error)}"
    return text


def to_text(nodes: dict[str, dict[str, Any] | None], marked: str) -> str:
    """A tree from each root down its dependants; a job with several parents is drawn once, then named."""
    children: dict[str, list[str]] = {}
    for job_id, view in nodes.items():
        for parent in (view or {}).get("parents", ()):
            children.setdefault(parent, []).append(job_id)
    roots = [i for i, v in nodes.items() if not any(p in nodes for p in (v or {}).get("parents", ()))]
    lines: list[str] = []
    drawn: set[str] = set()

    def draw(job_id: str, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        star = "* " if job_id == marked else ""
        if job_id in drawn:
            lines.append(f"{prefix}{branch}{star}{job_id} (shown above)")
            return
        drawn.add(job_id)
        lines.append(f"{prefix}{branch}{star}{_label(job_id, nodes.get(job_id))}")
        kids = [k for k in children.get(job_id, ()) if k in nodes]
        inner = prefix + ("" if top else ("    " if last else "│   "))
        for n, kid in enumerate(kids):
            draw(kid, inner, n == len(kids) - 1, False)

    for root in roots or [marked]:
        draw(root, "", True, True)
    return "\n".join(lines)


def to_dot(nodes: dict[str, dict[str, Any] | None], edges: list[tuple[str, str]], marked: str) -> str:
    out = ["digraph conveyor {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fontname="monospace"];']
    for job_id, view in nodes.items():
        state = "forgotten" if view is None else str(view.get("state", "?"))
        fn = "" if view is None else str(view.get("fn", "?"))
        label = "\\n".join(_dot_escape(x) for x in (job_id, fn, state) if x)
        extra = ", penwidth=3" if job_id == marked else ""
        out.append(f'  "{_dot_escape(job_id)}" [label="{label}", fillcolor={_COLOURS.get(state, "white")}{extra}];')
    for parent, child in edges:
        out.append(f'  "{_dot_escape(parent)}" -> "{_dot_escape(child)}";')
    out.append("}")
    return "\n".join(out)


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
