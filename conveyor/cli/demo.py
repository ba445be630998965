"""`conveyor demo`: run the experiments, write the report, print a summary table.

Registered in conveyor/cli/__init__.py; heavy imports wait until it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes: about a minute on 2 cores.")] = False,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory for report.md, the PNG plots and results.json.")
    ] = Path("conveyor-demo"),
    dispatcher: Annotated[
        str | None,
        typer.Option(
            "--dispatcher", "-d",
            help="Run experiments 1, 2 and 10 on this running cluster when it has suitable workers "
            "(the others always start local clusters). Default: local clusters only.",
        ),
    ] = None,
) -> None:
    """Measure processes, threads, asyncio, interpreters (3.12+) and the GIL on Conveyor; write a report with plots."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from conveyor.demo import plots
    from conveyor.demo.harness import Progress as Steps
    from conveyor.demo.harness import Sizes
    from conveyor.demo.report import terminal_table, write_outputs
    from conveyor.demo.runner import run_all, total_units

    err = Console(stderr=True)
    sizes = Sizes.for_machine(quick)
    if dispatcher is not None:
        from conveyor.client import Client

        Client(dispatcher, connect_timeout=5).close()  # fail now, with one line, if nobody answers
    if not plots.available():
        err.print("[yellow]matplotlib is not installed: the report will have no plots "
                  "(pip install 'conveyor[demo]').[/]")
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("starting", total=total_units(sizes))
        steps = Steps(
            on_step=lambda d: bar.update(task, description=d),
            on_advance=lambda n: bar.advance(task, n),
        )
        results = run_all(sizes, dispatcher, steps)
        bar.update(task, description="writing the report", completed=total_units(sizes))
        write_outputs(results, out)
    Console().print(terminal_table(results))
    failed = [n for n, e in results["experiments"].items() if "error" in e]
    print(f"report: {out / 'report.md'}  raw numbers: {out / 'results.json'}")
    if failed:
        err.print(f"[red]experiment(s) {', '.join(failed)} failed; see the report.[/]")
        raise typer.Exit(1)
