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
        # A job of several shots: each shot's length and progress; the bar shows their weighted sum.
        self._shot_seconds: list[float] = []
        self._shot_progress: dict[int, float] = {}

    def _shot_done(self, shot: int, fraction: float) -> None:
        self._shot_progress[shot] = fraction
        total = sum(self._shot_seconds) or 1.0
        done = sum(self._shot_seconds[index] * value for index, value in self._shot_progress.items())
        finished = sum(1 for value in self._shot_progress.values() if value >= 1.0)
        self._progress.update(
            self._task,
            completed=min(done / total, 1.0),
            description=f"{state_name(self._state or 0)} · {finished}/{len(self._shot_seconds)} shots",
        )

    def _prefix(self, shot: int) -> str:
        return f"shot {shot + 1}/{len(self._shot_seconds)}: " if len(self._shot_seconds) > 1 else ""

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
            job = response.job
            self._snapshot_sequence = job.last_sequence
            self._set_state(job.state, job.job_id)
            self._progress.update(self._task, completed=job.progress)
            if len(job.plan.shots) > 1:
                self._shot_seconds = [shot.duration_seconds for shot in job.plan.shots]
                for status in job.shots:
                    self._shot_done(status.index, status.progress)
            return
        event = response.event
        current = event.sequence > self._snapshot_sequence
        if current:
            self._set_state(event.state, event.job_id)
        render = event.render
        match render.WhichOneof("kind"):
            case "progress" if current and self._shot_seconds:
                self._shot_done(render.shot, render.progress.fraction)
            case "progress" if current:
                self._progress.update(self._task, completed=render.progress.fraction)
            case "routed":
                name = backend_name(render.routed.backend)
                # The router's reason may start with the backend's name, already said here.
                reason = render.routed.reason.removeprefix(f"{name}: ")
                self._note(f"  {self._prefix(render.shot)}routed to {name}: {escape(reason)}")
            case "fallback":
                fallback = render.fallback
                cause = fallback.cause
                self._note(
                    f"  {self._prefix(render.shot)}[yellow]falling back[/yellow] from "
                    f"{backend_name(fallback.from_backend)} to "
                    f"{backend_name(fallback.to_backend)}: {reason_name(cause.reason)}: {escape(cause.message)}"
                )
            case "failed":
                self._note(
                    f"  {self._prefix(render.shot)}[red]failed[/red]: {reason_name(render.failed.reason)}: "
                    f"{escape(render.failed.message)}"
                )
            case "succeeded" if self._shot_seconds:
                self._shot_done(render.shot, 1.0)
                self._note(
                    f"  {self._prefix(render.shot)}rendered by {backend_name(render.succeeded.backend)}"
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
