"""Shows a render as it happens: a progress bar fed by the job's events, and a line per change."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from aiprod.gateway.v1 import gateway_pb2
from aiprod_cli.output import state_name
from aiprod_kit.capabilities import backend_name
from aiprod_kit.failures import reason_name


class Reporter(Protocol):
    def show(self, response: gateway_pb2.WatchRenderJobResponse) -> None: ...

    def reconnecting(self, reason: str) -> None: ...


class SilentReporter:
    """For --json: stdout carries only the final object, and there is no one to show progress to."""

    def show(self, response: gateway_pb2.WatchRenderJobResponse) -> None:
        pass

    def reconnecting(self, reason: str) -> None:
        pass


class ProgressReporter:
    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID = progress.add_task("", total=1.0)
        self._state: int | None = None
        # The sequence the latest snapshot is as of: events up to it are history the snapshot already
        # shows, and their states and progress would move the display backwards.
        self._snapshot_sequence = 0

    def _note(self, text: str) -> None:
        # Printed above the bar, which stays at the bottom.
        self._progress.console.print(text, highlight=False)

    def _set_state(self, state: int, job_id: str) -> None:
        if state != self._state:
            self._state = state
            self._note(f"{escape(job_id)}: [bold]{state_name(state)}[/bold]")
            self._progress.update(self._task, description=state_name(state))

    def show(self, response: gateway_pb2.WatchRenderJobResponse) -> None:
        if response.WhichOneof("kind") == "job":
            self._snapshot_sequence = response.job.last_sequence
            self._set_state(response.job.state, response.job.job_id)
            self._progress.update(self._task, completed=response.job.progress)
            return
        event = response.event
        current = event.sequence > self._snapshot_sequence
        if current:
            self._set_state(event.state, event.job_id)
        render = event.render
        match render.WhichOneof("kind"):
            case "progress" if current:
                self._progress.update(self._task, completed=render.progress.fraction)
            case "routed":
                name = backend_name(render.routed.backend)
                # The router's reason may start with the backend's name, already said here.
                reason = render.routed.reason.removeprefix(f"{name}: ")
                self._note(f"  routed to {name}: {escape(reason)}")
            case "fallback":
                fallback = render.fallback
                cause = fallback.cause
                self._note(
                    f"  [yellow]falling back[/yellow] from {backend_name(fallback.from_backend)} to "
                    f"{backend_name(fallback.to_backend)}: {reason_name(cause.reason)}: {escape(cause.message)}"
                )
            case "failed":
                self._note(
                    f"  [red]failed[/red]: {reason_name(render.failed.reason)}: {escape(render.failed.message)}"
                )
            case "succeeded":
                self._progress.update(self._task, completed=1.0)

    def reconnecting(self, reason: str) -> None:
        self._note(f"[yellow]stream broken ({escape(reason)}); reconnecting…[/yellow]")


@contextmanager
def progress_reporter(console: Console) -> Iterator[ProgressReporter]:
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        yield ProgressReporter(progress)
