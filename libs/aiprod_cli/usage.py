"""`aiprod usage`: the calling tenant's jobs and spend, as the gateway reports them (GetUsage)."""

from datetime import date
from typing import Annotated

import typer

from aiprod.gateway.v1 import gateway_pb2
from aiprod_cli.gateway import (
    CALL_TIMEOUT_SECONDS,
    DEFAULT_GATEWAY,
    ApiKeyOption,
    GatewayOption,
    connect,
    exit_on_rpc_error,
)
from aiprod_cli.output import JsonOption, message_to_dict, print_json, stdout, usage_table


def _day(value: str | None) -> str | None:
    """A YYYY-MM-DD day, checked here so that a typo gets the option's name."""
    if value is None:
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a day in the form YYYY-MM-DD") from None


def usage(
    first_day: Annotated[
        str | None,
        typer.Option(
            "--from",
            metavar="YYYY-MM-DD",
            callback=_day,
            help="First day of the spend range (default: today).",
        ),
    ] = None,
    last_day: Annotated[
        str | None,
        typer.Option(
            "--to",
            metavar="YYYY-MM-DD",
            callback=_day,
            help="Last day of the range, included (default: --from).",
        ),
    ] = None,
    gateway: GatewayOption = DEFAULT_GATEWAY,
    api_key: ApiKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Show the tenant's usage: jobs, spend and budget.

    Its tier, jobs by state, approval rate, spend today and over a range of days, money reserved, budget
    left, and the quoted against the actual cost of its finished jobs.

    Exits 2 when the gateway refuses or cannot be reached.
    """
    request = gateway_pb2.GetUsageRequest(first_day=first_day or "", last_day=last_day or "")
    with exit_on_rpc_error(gateway), connect(gateway, api_key) as connection:
        response = connection.stub.GetUsage(request, timeout=CALL_TIMEOUT_SECONDS)
    if json_output:
        print_json(message_to_dict(response))
    else:
        stdout.print(usage_table(response))
