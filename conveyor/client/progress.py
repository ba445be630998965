"""Progress bars on the client side: `Client.map(progress=True)`, AsyncClient.map, `conveyor map` and
`conveyor submit --wait`.

A bar is drawn on stderr only when stderr is a terminal; otherwise nothing is printed, so piped output
stays machine-readable. Bars show the rate and an ETA.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


def stderr_console() -> Console:
    return Console(stderr=True)


def bar_wanted(console: Console | None = None) -> bool:
    """True when stderr is an interactive terminal (not a pipe, not a file, not TERM=dumb)."""
    console = console or stderr_console()
    return console.is_terminal and not console.is_dumb_terminal


class RateColumn(ProgressColumn):
    """Items per second, as rich measures it (a moving window)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("-/s", style="progress.data.speed")
        unit = "/s"
        if speed < 1:
            return Text(f"{speed * 60:.1f}/min", style="progress.data.speed")
        return Text(f"{speed:,.1f}{unit}" if speed < 100 else f"{speed:,.0f}{unit}", style="progress.data.speed")


def _map_progress(console: Console, known_total: bool) -> Progress:
    columns: list[ProgressColumn | str] = [SpinnerColumn(), TextColumn("[bold]{task.description}")]
    if known_total:
        columns += [BarColumn(), MofNCompleteColumn(), TaskProgressColumn()]
    else:
        columns += [TextColumn("{task.completed:,.0f} done")]
    columns += [RateColumn(), TimeElapsedColumn()]
    if known_total:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    # Results printed to the same terminal go above the bar; printed to a pipe or a file, they stay there.
    same_terminal = sys.stdout.isatty()
    return Progress(
        *columns, console=console, transient=False, speed_estimate_period=10.0,
        redirect_stdout=same_terminal, redirect_stderr=False,
    )


def track(results: Iterator[Any], total: int | None, description: str) -> Iterator[Any]:
    """Yield results unchanged, advancing a bar on stderr when it is a terminal."""
    console = stderr_console()
    if not bar_wanted(console):
        yield from results
        return
    try:
        with _map_progress(console, total is not None) as bar:
            task = bar.add_task(description, total=total)
            for value in results:
                yield value
                bar.advance(task)
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()  # stop the map: cancels what is still in flight


async def atrack(results: AsyncIterator[Any], total: int | None, description: str) -> AsyncIterator[Any]:
    """track() for an async iterator (AsyncClient.map)."""
    console = stderr_console()
    try:
        if not bar_wanted(console):
            async for value in results:
                yield value
            return
        with _map_progress(console, total is not None) as bar:
            task = bar.add_task(description, total=total)
            async for value in results:
                yield value
                bar.advance(task)
    finally:
        aclose = getattr(results, "aclose", None)
        if aclose is not None:
            await aclose()  # stop the map: cancels what is still in flight


def wait_with_progress(
    client: Any, job_id: str, description: str, poll: float = 0.5
) -> tuple[dict[str, Any], list[Any]]:
    """Wait for one job like `client.wait_record`, showing its state and reported progress on stderr.

    The bar follows the fraction the task reports with `conveyor.progress()`; ETA follows from how
    fast that fraction moves. Without a terminal this is a plain wait.
    """
    console = stderr_console()
    if not bar_wanted(console):
        return client.wait_record(job_id)  # type: ignore[no-any-return]
    with ThreadPoolExecutor(1, thread_name_prefix="conveyor-wait") as pool:
        done: Future[tuple[dict[str, Any], list[Any]]] = pool.submit(client.wait_record, job_id)
        columns: list[ProgressColumn | str] = [
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("[dim]{task.fields[message]}"),
        ]
        with Progress(
            *columns, console=console, transient=True, speed_estimate_period=30.0,
            redirect_stdout=False, redirect_stderr=False,
        ) as bar:
            task = bar.add_task(description, total=1.0, state="submitted", message="")
            while True:
                try:
                    return done.result(timeout=poll)
                except FutureTimeout:
                    pass
                _update_from_info(client, job_id, lambda **kw: bar.update(task, **kw))


def _update_from_info(client: Any, job_id: str, update: Callable[..., None]) -> None:
    try:
        view = client.job_info(job_id, timeout=5.0)[0]
    except Exception:  # the bar is a nicety: a slow answer must not end the wait
        return
    if view is None:
        return
    state = view.get("state", "?")
    if state == "running" and view.get("worker"):
        state = f"running on {view['worker']}"
    if view.get("attempts", 0) > 1:
        state += f" (attempt {view['attempts']})"
    fields: dict[str, Any] = {"state": state}
    progress = view.get("progress")
    if progress:
        if progress.get("fraction") is not None:
            fields["completed"] = float(progress["fraction"])
        fields["message"] = progress.get("message") or ""
    update(**fields)


def format_progress(progress: dict[str, Any] | None) -> str:
    """`42% writing part 3` for a progress report, '' for none."""
    if not progress:
        return ""
    parts = []
    if progress.get("fraction") is not None:
        parts.append(f"{100 * float(progress['fraction']):.0f}%")
    if progress.get("message"):
        parts.append(str(progress["message"]))
    return " ".join(parts)
