"""`aiprod slo`: the service level objectives and how they are met."""

from rich import box

from aiprod.metrics.v1 import metrics_pb2
from aiprod_cli.budget import DEFAULT_METRICS, MetricsOption, connect_metrics
from aiprod_cli.gateway import CALL_TIMEOUT_SECONDS, exit_on_rpc_error
from aiprod_cli.output import JsonOption, message_to_dict, new_table, print_json, stdout


def slo(metrics: MetricsOption = DEFAULT_METRICS, json_output: JsonOption = False) -> None:
    """Show each SLO: its goal, the attainment over its window and the error budget left.

    Exits 2 when the metrics service cannot be reached.
    """
    with exit_on_rpc_error(metrics, "metrics service"), connect_metrics(metrics) as stub:
        response = stub.GetSloReport(metrics_pb2.GetSloReportRequest(), timeout=CALL_TIMEOUT_SECONDS)
    if json_output:
        print_json(message_to_dict(response))
        return
    table = new_table("slo", "goal", "attainment", "error budget left", "window", box=box.SIMPLE)
    for status in response.slos:
        table.add_row(
            status.name,
            f"{status.goal:.1%}",
            f"{status.attainment:.2%}",
            f"{status.error_budget_remaining:.0%}",
            f"{status.window_days} d",
        )
    stdout.print(table)
