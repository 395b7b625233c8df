"""`aiprod alerts`: the metrics service's alert policies, firing and resolved."""

from rich import box

from aiprod.metrics.v1 import metrics_pb2
from aiprod_cli.budget import DEFAULT_METRICS, MetricsOption, connect_metrics
from aiprod_cli.gateway import CALL_TIMEOUT_SECONDS, exit_on_rpc_error
from aiprod_cli.output import JsonOption, message_to_dict, new_table, print_json, stdout
from aiprod_kit.capabilities import backend_name


def alerts(metrics: MetricsOption = DEFAULT_METRICS, json_output: JsonOption = False) -> None:
    """Show every alert policy: whether it fires, since when, its value and threshold.

    Exits 2 when the metrics service cannot be reached.
    """
    with exit_on_rpc_error(metrics, "metrics service"), connect_metrics(metrics) as stub:
        response = stub.ListAlerts(metrics_pb2.ListAlertsRequest(), timeout=CALL_TIMEOUT_SECONDS)
    if json_output:
        print_json(message_to_dict(response))
        return
    table = new_table("policy", "backend", "state", "severity", "value", "threshold", "since", box=box.SIMPLE)
    for alert in response.alerts:
        table.add_row(
            alert.policy,
            backend_name(alert.backend) if alert.backend else "",
            "FIRING" if alert.firing else "ok",
            alert.severity,
            f"{alert.value:g}",
            f"{alert.threshold:g}",
            alert.since_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC"),
        )
    stdout.print(table)
