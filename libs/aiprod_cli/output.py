"""What the CLI prints: JSON for machines on stdout, rich tables for people, notes on stderr."""

import json
from typing import Annotated, Any

import typer
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from aiprod.common.v1 import job_pb2, money_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.capabilities import backend_name
from aiprod_kit.failures import reason_name

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


def message_to_dict(message: Message) -> dict[str, Any]:
    """Every field, zero values included; a message field that is not set is null rather than missing."""
    value = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for field in message.DESCRIPTOR.fields:
        if field.message_type is not None and field.has_presence and not message.HasField(field.name):
            value.setdefault(field.name, None)
    return value


def state_name(state: int) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def _aspect_ratio_name(aspect_ratio: int) -> str:
    return render_pb2.AspectRatio.Name(aspect_ratio).removeprefix("ASPECT_RATIO_").replace("_", ":")


def _health_name(health: int) -> str:
    return router_pb2.BackendHealth.Name(health).removeprefix("BACKEND_HEALTH_").lower()


def _breaker_name(breaker: int) -> str:
    return router_pb2.BreakerState.Name(breaker).removeprefix("BREAKER_STATE_").lower()


def _money(money: money_pb2.Money) -> str:
    return f"{money.amount_micros / 1e6:.2f} {money.currency_code or 'USD'}"


def _seconds(duration: duration_pb2.Duration) -> str:
    """A latency; a zero one means the router has no figure yet."""
    if not duration.seconds and not duration.nanos:
        return "-"
    return f"{duration.ToTimedelta().total_seconds():.1f} s"


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
        rows.append(("error", f"{reason_name(job.error.reason)}: {job.error.message}"))
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


def backends_table(backends: list[router_pb2.BackendStatus]) -> Table:
    """The router's backends; the figures cover its recent renders, "-" before the first."""
    table = new_table(
        "backend", "health", "breaker", "p95", "success", "QC avg", "price/s", "renders", box=box.SIMPLE
    )
    for column in table.columns[3:]:  # the figures
        column.justify = "right"
    for status in backends:
        rendered = status.renders > 0
        table.add_row(
            backend_name(status.backend),
            _health_name(status.health),
            _breaker_name(status.breaker),
            _seconds(status.p95_latency),
            f"{status.success_rate:.0%}" if rendered else "-",
            f"{status.qc_average:.2f}" if rendered and status.qc_average else "-",
            # Known once the router has reached the renderer.
            _money(status.price_per_second) if status.HasField("price_per_second") else "-",
            str(status.renders),
        )
    return table


def route_table(candidates: list[router_pb2.RouteCandidate]) -> Table:
    """A route plan: every backend, eligible ones first by rank, each with the router's reasons."""
    table = new_table(
        "rank",
        "backend",
        "eligible",
        "est. cost",
        "est. latency",
        "reasons",
        title="Route plan",
        box=box.SIMPLE,
    )
    for candidate in candidates:
        table.add_row(
            str(candidate.rank) if candidate.eligible else "-",
            backend_name(candidate.backend),
            "yes" if candidate.eligible else "no",
            _money(candidate.estimated_cost),
            _seconds(candidate.estimated_latency),
            # Text, not str: the reasons are the router's words, not rich markup.
            Text("\n".join(candidate.reasons)),
        )
    return table
