"""What the CLI prints: JSON for machines on stdout, rich tables for people, notes on stderr."""

import json
import os
from datetime import UTC, datetime
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
from aiprod.gateway.v1 import admin_pb2, gateway_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.capabilities import backend_name, offers
from aiprod_kit.failures import reason_name

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")
]

# Wide enough for any row: a table printed at this width takes its own.
_UNBOUNDED_WIDTH = 100_000


def console(**options: Any) -> Console:
    """A rich console as wide as its terminal; into a pipe or a file, as wide as each line needs.

    Rich gives a console that is not a terminal 80 columns (or `COLUMNS`), which folds a table's cells
    into a column of fragments that neither a reader of the log nor a `grep` can use.
    """
    made = Console(**options)
    if not made.is_terminal and "COLUMNS" not in os.environ:
        made.width = _UNBOUNDED_WIDTH
    return made


stdout = console()
# Progress, notes and errors go here, so that stdout stays clean for the result.
stderr = console(stderr=True)


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


def enum_word(enum: Any, value: int) -> str:
    """An enum value as a lower-case word ("PRIORITY_HIGH": "high"); "-" when it is not set."""
    if value == 0:
        return "-"
    name: str = enum.Name(value)
    # The enum's prefix is its type's name in upper snake case, as buf's lint asks.
    prefix = enum.Name(0).removesuffix("UNSPECIFIED")
    return name.removeprefix(prefix).lower()


def tier_name(tier: int) -> str:
    # Unspecified means BRONZE (admin.proto).
    return enum_word(admin_pb2.SlaTier, tier or admin_pb2.SLA_TIER_BRONZE)


def _health_name(health: int) -> str:
    return router_pb2.BackendHealth.Name(health).removeprefix("BACKEND_HEALTH_").lower()


def _breaker_name(breaker: int) -> str:
    return router_pb2.BreakerState.Name(breaker).removeprefix("BREAKER_STATE_").lower()


def money(money: money_pb2.Money) -> str:
    return f"{money.amount_micros / 1e6:.2f} {money.currency_code or 'USD'}"


_money = money


def _seconds(duration: duration_pb2.Duration) -> str:
    """A latency; a zero one means the router has no figure yet."""
    if not duration.seconds and not duration.nanos:
        return "-"
    return f"{duration.ToTimedelta().total_seconds():.1f} s"


def time_text(timestamp: timestamp_pb2.Timestamp) -> str:
    return _time(timestamp)


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


def _image_text(image: render_pb2.Image) -> str:
    return image.uri or f"{image.mime_type or 'image'}, {len(image.data)} bytes inline"


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
    if job.tenant_id:
        rows.append(("tenant", job.tenant_id))
    constraints = job.spec.constraints
    if constraints.quality_floor:
        rows.append(("quality floor", f"{constraints.quality_floor:.2f}"))
    if constraints.HasField("deadline"):
        rows.append(("deadline", _time(constraints.deadline)))
    if job.spec.first_frame.data or job.spec.first_frame.uri:
        rows.append(("first frame", _image_text(job.spec.first_frame)))
    if job.plan_version:
        rows.append(("plan version", str(job.plan_version)))
    if len(job.plan.shots) > 1:
        done = sum(1 for status in job.shots if status.state == job_pb2.JOB_STATE_SUCCEEDED)
        rows.append(("shots", f"{len(job.plan.shots)}, {done} rendered"))
    # An edit in review changes the plan, not what was asked for.
    edited = [shot.prompt for shot in job.plan.shots if shot.prompt != job.spec.prompt.strip()]
    if edited:
        rows.append(("plan prompt", " | ".join(shot.prompt for shot in job.plan.shots)))
    if job.HasField("quote") and job.quote.HasField("price"):
        rows.append(("quote", f"{_money(job.quote.price)} (at most {_money(job.quote.max_cost)})"))
    if job.HasField("cost"):
        rows.append(("cost", _money(job.cost)))
    if job.HasField("result"):
        rows.append(("video", job.result.video.uri))
    if job.HasField("error"):
        rows.append(("error", f"{reason_name(job.error.reason)}: {job.error.message}"))
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


def offer_name(backend: int, model: str = "", resolution: str = "") -> str:
    """A backend, with the model and resolution of a route at it when known ("runway gen4_turbo 720p")."""
    return " ".join(filter(None, (backend_name(backend), model, resolution)))


def backends_table(backends: list[router_pb2.BackendStatus]) -> Table:
    """The router's backends; the figures cover its recent renders, "-" before the first."""
    table = new_table(
        "backend",
        "health",
        "breaker",
        "p95",
        "success",
        "QC avg",
        "price/s",
        "renders",
        "models",
        box=box.SIMPLE,
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
            # Every model and resolution it offers, each a route candidate (the default first).
            ", ".join(f"{o.model} {o.resolution}" for o in offers(status.capabilities))
            if status.HasField("capabilities")
            else "-",
        )
    return table


def _duration_text(seconds: float) -> str:
    return f"{seconds:g} s"


def presets_table(presets: list[gateway_pb2.Preset]) -> Table:
    """The presets a job can use, with their limits; enums as lower-case words."""
    table = new_table(
        "preset",
        "pipeline",
        "floor",
        "max duration",
        "default duration",
        "price limit/min",
        "approval",
        "priority",
        box=box.SIMPLE,
    )
    table.columns[0].no_wrap = True  # the name, to be copied into --preset
    for column in table.columns[2:6]:  # the figures
        column.justify = "right"
    for preset in presets:
        table.add_row(
            preset.name,
            enum_word(gateway_pb2.Pipeline, preset.pipeline),
            f"{preset.quality_floor:.2f}",
            _duration_text(preset.max_duration_seconds),
            _duration_text(preset.default_duration_seconds),
            _money(preset.max_price_per_minute) if preset.HasField("max_price_per_minute") else "-",
            "required" if preset.requires_approval else "no",
            enum_word(gateway_pb2.Priority, preset.priority),
        )
    return table


def quote_rows(quote: gateway_pb2.Quote) -> list[tuple[str, str]]:
    """A quote's figures, as (name, value) rows: id, expiry, route, price, maximum, baseline, saving."""
    rows = [
        ("quote", quote.quote_id or "-"),
        ("expires", _time(quote.expire_time) or "-"),
        ("route", offer_name(quote.backend, quote.model, quote.resolution) if quote.backend else "-"),
        ("price", _money(quote.price if quote.HasField("price") else quote.estimated_cost)),
        ("at most", _money(quote.max_cost)),
    ]
    if quote.HasField("baseline_cost"):
        baseline = backend_name(quote.baseline_backend) if quote.baseline_backend else "baseline"
        rows.append(("baseline", f"{_money(quote.baseline_cost)} ({baseline})"))
        rows.append(("saving", _money(quote.savings)))
    if quote.HasField("cheapest_cost"):
        rows.append(("cheapest", _money(quote.cheapest_cost)))
    return rows


def quote_table(quote: gateway_pb2.Quote) -> Table:
    table = new_table("field", "value", show_header=False, box=box.SIMPLE)
    for name, value in quote_rows(quote):
        table.add_row(name, Text(value))
    return table


def estimates_table(estimates: list[gateway_pb2.BackendEstimate], title: str = "Estimates") -> Table:
    """Every backend's estimate, the route first: whether it qualifies, and why not."""
    table = new_table(
        "rank",
        "backend",
        "qualifies",
        "estimate",
        "est. latency",
        "reasons",
        title=title,
        box=box.SIMPLE,
    )
    for estimate in estimates:
        table.add_row(
            str(estimate.rank) if estimate.qualifies and estimate.rank else "-",
            offer_name(estimate.backend, estimate.model, estimate.resolution),
            "yes" if estimate.qualifies else "no",
            _money(estimate.estimated_cost),
            _seconds(estimate.estimated_latency),
            Text("\n".join(estimate.reasons)),
        )
    return table


def plan_table(plan: render_pb2.RenderPlan, version: int) -> Table:
    """A job's plan: its shots in playing order."""
    table = new_table(
        "shot", "duration", "aspect ratio", "prompt", title=f"Plan, version {version}", box=box.SIMPLE
    )
    for index, shot in enumerate(plan.shots):
        table.add_row(
            str(index),
            _duration_text(shot.duration_seconds),
            _aspect_ratio_name(shot.aspect_ratio) if shot.aspect_ratio else "-",
            Text(shot.prompt),
        )
    return table


def shots_table(job: gateway_pb2.RenderJob) -> Table:
    """A job of several shots as they render: each shot's state, backend, cost and video."""
    table = new_table(
        "shot", "duration", "state", "backend", "attempt", "cost", "video", title="Shots", box=box.SIMPLE
    )
    statuses = {status.index: status for status in job.shots}
    for index, shot in enumerate(job.plan.shots):
        status = statuses.get(index, gateway_pb2.ShotStatus())
        table.add_row(
            str(index),
            _duration_text(shot.duration_seconds),
            state_name(status.state) if status.state else "QUEUED",
            backend_name(status.backend) if status.backend else "",
            str(status.attempt) if status.attempt else "",
            _money(status.cost) if status.HasField("cost") else "",
            Text(status.output.video.uri),
        )
    return table


def revisions_table(revisions: list[gateway_pb2.PlanRevision]) -> Table:
    """A job's plan revisions, oldest first: who changed what, when, and the price of each."""
    table = new_table("version", "when", "author", "changes", "price", box=box.SIMPLE)
    for revision in revisions:
        quote = revision.quote
        price = quote.price if quote.HasField("price") else quote.estimated_cost
        table.add_row(
            str(revision.plan_version),
            _time(revision.create_time),
            Text(revision.author),
            Text(", ".join(revision.changes) or ("created" if revision.plan_version == 1 else "-")),
            _money(price) if revision.HasField("quote") else "-",
        )
    return table


def tenants_table(tenants: list[admin_pb2.Tenant]) -> Table:
    table = new_table("tenant", "name", "tier", "daily budget", "state", "created", box=box.SIMPLE)
    for tenant in tenants:
        budget = tenant.daily_budget
        table.add_row(
            tenant.tenant_id,
            Text(tenant.display_name),
            tier_name(tenant.tier),
            _money(budget) if budget.amount_micros else "global cap",
            "disabled" if tenant.disabled else "enabled",
            _time(tenant.create_time),
        )
    return table


def api_key_state(key: admin_pb2.ApiKey) -> str:
    if key.HasField("revoke_time"):
        return "revoked"
    if key.HasField("expire_time") and key.expire_time.ToDatetime() <= datetime.now(UTC).replace(tzinfo=None):
        return "expired"
    return "active"


def api_keys_table(keys: list[admin_pb2.ApiKey]) -> Table:
    """API keys without their secrets: the prefix is how a key is recognised."""
    table = new_table("prefix", "tenant", "name", "state", "created", "expires", box=box.SIMPLE)
    for key in keys:
        table.add_row(
            key.prefix,
            key.tenant_id,
            Text(key.name),
            api_key_state(key),
            _time(key.create_time),
            _time(key.expire_time) if key.HasField("expire_time") else "never",
        )
    return table


def usage_table(usage: gateway_pb2.GetUsageResponse) -> Table:
    """The tenant's usage, field by field."""
    days = usage.first_day if usage.first_day == usage.last_day else f"{usage.first_day} to {usage.last_day}"
    jobs = ", ".join(f"{state_name(count.state).lower()} {count.count}" for count in usage.jobs) or "none"
    quoted, actual = usage.quoted_total.amount_micros, usage.actual_total.amount_micros
    variance = f" ({(actual - quoted) / quoted:+.0%})" if quoted else ""
    daily = usage.daily_budget
    rows = [
        ("tenant", usage.tenant_id),
        ("tier", tier_name(usage.tier)),
        ("jobs", jobs),
        ("approval rate", f"{usage.approval_rate:.0%}"),
        ("spend today", _money(usage.spend_today)),
        (f"spend {days}" if days else "spend in range", _money(usage.spend_in_range)),
        ("reserved", _money(usage.reserved)),
        ("budget left", _money(usage.budget_left)),
        ("daily budget", _money(daily) if daily.amount_micros else "global cap"),
        (
            "quoted vs actual",
            f"{_money(usage.quoted_total)} quoted, {_money(usage.actual_total)} actual{variance}",
        ),
    ]
    table = new_table("field", "value", show_header=False, box=box.SIMPLE)
    for name, value in rows:
        table.add_row(name, Text(value))
    return table
