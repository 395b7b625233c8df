"""What the CLI prints: JSON for machines on stdout, rich tables for people, notes on stderr."""

import json
from typing import Annotated, Any

import typer
from google.protobuf import timestamp_pb2
from google.protobuf.json_format import MessageToDict
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")
]

stdout = Console()
# Progress, notes and errors go here, so that stdout stays clean for the result.
stderr = Console(stderr=True)


def print_line(text: str) -> None:
    """Prints a result meant for scripts (a path, JSON) on stdout as it is."""
    # Plain print rather than rich: rich wraps long lines and colours a terminal.
    print(text, flush=True)


def print_json(value: Any) -> None:
    print_line(json.dumps(value))


def job_to_dict(job: gateway_pb2.RenderJob) -> dict[str, Any]:
    return MessageToDict(job, preserving_proto_field_name=True)


def state_name(state: int) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def backend_name(backend: int) -> str:
    return backend_pb2.Backend.Name(backend).removeprefix("BACKEND_").lower()


def _aspect_ratio_name(aspect_ratio: int) -> str:
    return render_pb2.AspectRatio.Name(aspect_ratio).removeprefix("ASPECT_RATIO_").replace("_", ":")


def _time(timestamp: timestamp_pb2.Timestamp) -> str:
    if not timestamp.seconds and not timestamp.nanos:
        return ""
    return timestamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")


def new_table(*headers: str, **options: Any) -> Table:
    """A table whose cells wrap rather than end in an ellipsis: ids and paths are there to be copied."""
    table = Table(**options)
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


def jobs_table(jobs: list[gateway_pb2.RenderJob]) -> Table:
    """Newest first, narrow enough for 80 columns; `aiprod jobs get` shows the rest of a job."""
    table = new_table("job", "state", "prompt", box=box.SIMPLE)
    # The prompt wraps rather than the job id, which is there to be copied whole.
    for column in table.columns[:2]:
        column.no_wrap = True
    for job in jobs:
        state = state_name(job.state)
        if job.state == job_pb2.JOB_STATE_RUNNING:
            state += f" {job.progress:.0%}"
        cells = (job.job_id, state, job.spec.prompt)
        # Text, not str: a prompt is the user's text, not rich markup.
        table.add_row(*map(Text, cells))
    return table


def job_table(job: gateway_pb2.RenderJob) -> Table:
    """One job, field by field."""
    table = new_table("field", "value", show_header=False)
    rows = [
        ("job", job.job_id),
        ("request id", job.request_id),
        ("state", state_name(job.state)),
        ("progress", f"{job.progress:.0%}"),
        ("prompt", job.spec.prompt),
        ("preset", job.spec.preset),
        ("duration", f"{job.spec.duration_seconds:g} s"),
        ("aspect ratio", _aspect_ratio_name(job.spec.aspect_ratio)),
        ("backend", backend_name(job.backend) if job.backend else ""),
        ("created", _time(job.create_time)),
        ("updated", _time(job.update_time)),
    ]
    if job.HasField("result"):
        rows.append(("video", job.result.video.uri))
    if job.HasField("error"):
        rows.append(("error", f"{job.error.reason}: {job.error.message}"))
    for name, value in rows:
        table.add_row(name, Text(value))
    return table
