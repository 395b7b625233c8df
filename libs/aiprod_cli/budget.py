"""`aiprod budget`: today's budget from the metrics service's ledger, for a tenant (the API key's, by
default) and overall."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from aiprod.common.v1 import money_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_cli.gateway import (
    CALL_TIMEOUT_SECONDS,
    DEFAULT_GATEWAY,
    ApiKeyOption,
    GatewayOption,
    connect,
    exit_on_rpc_error,
    open_channel,
)
from aiprod_cli.output import JsonOption, message_to_dict, new_table, print_json, stdout
from aiprod_kit.money import budget_level_name
from aiprod_kit.settings import METRICS_PORT

MetricsOption = Annotated[
    str,
    typer.Option(
        "--metrics", metavar="ADDRESS", envvar="AIPROD_METRICS", help="The metrics service's host:port."
    ),
]
DEFAULT_METRICS = f"localhost:{METRICS_PORT}"


@contextmanager
def connect_metrics(address: str) -> Iterator[metrics_pb2_grpc.MetricsServiceStub]:
    with open_channel(address) as channel:
        yield metrics_pb2_grpc.MetricsServiceStub(channel)


def _usd(money: money_pb2.Money) -> str:
    return f"{money.amount_micros / 1e6:,.2f}"


def _budget_table(budgets: dict[str, metrics_pb2.Budget]) -> Table:
    table = new_table(
        "budget", "day", "cap", "spent", "reserved", "remaining", "used", "level", box=box.SIMPLE
    )
    for name, budget in budgets.items():
        capped = budget.cap.amount_micros > 0
        table.add_row(
            name,
            budget.day,
            _usd(budget.cap) if capped else "no cap",
            _usd(budget.spent),
            _usd(budget.reserved),
            _usd(budget.remaining) if capped else "-",
            f"{budget.used_fraction:.0%}" if capped else "-",
            budget_level_name(budget.level),
        )
    return table


def _uncertain_line(budgets: dict[str, metrics_pb2.Budget]) -> str:
    """Uncertain money on a line of its own: it is inside spent, and would be missed as one more column."""
    amounts = ", ".join(f"{name} {_usd(budget.uncertain)}" for name, budget in budgets.items())
    return f"uncertain: {amounts} (expired, unreconciled: in spent at full amount)"


def key_tenant(gateway: str, api_key: str) -> str:
    """The tenant the API key orders for, as the gateway knows it (exits 2 when it refuses the key)."""
    with exit_on_rpc_error(gateway), connect(gateway, api_key) as connection:
        usage = connection.stub.GetUsage(gateway_pb2.GetUsageRequest(), timeout=CALL_TIMEOUT_SECONDS)
    return usage.tenant_id


def budget(
    tenant: Annotated[
        str,
        typer.Option(
            metavar="ID",
            help="The tenant (default: the API key's, asked of the gateway; without a key, the ledger's "
            "default tenant).",
        ),
    ] = "",
    metrics: MetricsOption = DEFAULT_METRICS,
    gateway: GatewayOption = DEFAULT_GATEWAY,
    api_key: ApiKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Show today's budget: cap, spent, reserved, remaining and level (ok, notify, economy, exhausted),
    and the uncertain money within spent (expired reservations nobody reconciled yet).

    Exits 2 when the metrics service cannot be reached, or the gateway refuses the API key.
    """
    if not tenant and api_key.strip():
        tenant = key_tenant(gateway, api_key)
    with exit_on_rpc_error(metrics, "metrics service"), connect_metrics(metrics) as stub:
        response = stub.GetBudget(
            metrics_pb2.GetBudgetRequest(tenant_id=tenant), timeout=CALL_TIMEOUT_SECONDS
        )
    budgets = {f"tenant {response.budget.tenant_id}": response.budget, "global": response.global_budget}
    if json_output:
        print_json(
            {"budget": message_to_dict(response.budget), "global": message_to_dict(response.global_budget)}
        )
    else:
        stdout.print(_budget_table(budgets))
        stdout.print(_uncertain_line(budgets), markup=False, highlight=False, soft_wrap=True)
