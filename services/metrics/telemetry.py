"""The metrics service's own metrics (docs/TELEMETRY.md): ledger operations as they happen, and the
state of the budget, the alert policies and the SLOs as gauges, read from a snapshot the service
refreshes (gauge callbacks run on the exporter's thread and cannot ask the async stores)."""

from collections.abc import Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from aiprod.metrics.v1 import metrics_pb2
from aiprod_kit.capabilities import backend_name
from aiprod_metrics.ledger import Totals

_LEVELS = {
    metrics_pb2.BUDGET_LEVEL_UNSPECIFIED: 0,
    metrics_pb2.BUDGET_LEVEL_OK: 0,
    metrics_pb2.BUDGET_LEVEL_NOTIFY: 1,
    metrics_pb2.BUDGET_LEVEL_ECONOMY: 2,
    metrics_pb2.BUDGET_LEVEL_EXHAUSTED: 3,
}


class MetricsTelemetry:
    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("aiprod.metrics")
        self._reservations = meter.create_counter(
            "aiprod.metrics.reservations",
            unit="{reservation}",
            description="Ledger operations: reserved, refused, committed, released, expired",
        )
        self._variance = meter.create_histogram(
            "aiprod.metrics.cost_variance", description="Actual over estimated cost of committed reservations"
        )
        self._budget: dict[str, float] = {}
        self._alerts: list[tuple[float, dict[str, str]]] = []
        self._slos: list[metrics_pb2.SloStatus] = []
        gauges = {
            "aiprod.metrics.daily_spend": ("spent", "Today's committed spend, all tenants"),
            "aiprod.metrics.budget_reserved": ("reserved", "Money held by today's open reservations"),
            "aiprod.metrics.budget_remaining": ("remaining", "Today's cap minus spent and reserved"),
            "aiprod.metrics.budget_uncertain": (
                "uncertain",
                "Today's expired, unreconciled reservations, counted in daily_spend at their full amount",
            ),
        }
        for name, (key, description) in gauges.items():
            meter.create_observable_gauge(
                name, callbacks=[self._budget_value(key)], unit="{USD}", description=description
            )
        meter.create_observable_gauge(
            "aiprod.metrics.budget_level",
            callbacks=[self._budget_value("level")],
            description="0 ok, 1 notify, 2 economy, 3 exhausted",
        )
        meter.create_observable_gauge(
            "aiprod.metrics.alerts_firing",
            callbacks=[self._alerts_firing],
            description="1 while an alert policy fires",
        )
        meter.create_observable_gauge(
            "aiprod.metrics.slo_attainment",
            callbacks=[self._slo_value("attainment")],
            description="Share of good jobs over the SLO's window",
        )
        meter.create_observable_gauge(
            "aiprod.metrics.slo_error_budget_remaining",
            callbacks=[self._slo_value("error_budget_remaining")],
            description="Share of the SLO's error budget left",
        )

    def reservation(self, outcome: str, count: int = 1) -> None:
        self._reservations.add(count, {"outcome": outcome})

    def committed(self, variance_ratio: float | None) -> None:
        self.reservation("committed")
        if variance_ratio is not None:
            self._variance.record(variance_ratio)

    def budget_read(self, everyone: Totals, cap: int, level: int) -> None:
        self._budget = {
            "spent": everyone.spent / 1e6,
            "reserved": everyone.reserved / 1e6,
            "uncertain": everyone.uncertain / 1e6,
            "remaining": max(cap - everyone.spent - everyone.reserved, 0) / 1e6 if cap > 0 else 0.0,
            "level": _LEVELS[level],
        }

    def alerts_evaluated(self, alerts: Iterable[metrics_pb2.Alert]) -> None:
        self._alerts = [
            (
                float(alert.firing),
                {"policy": alert.policy, "backend": backend_name(alert.backend) if alert.backend else ""},
            )
            for alert in alerts
        ]

    def slos_reported(self, slos: Iterable[metrics_pb2.SloStatus]) -> None:
        self._slos = list(slos)

    def _budget_value(self, key: str):
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            if key in self._budget:
                yield Observation(self._budget[key])

        return observe

    def _alerts_firing(self, options: CallbackOptions) -> Iterable[Observation]:
        for value, labels in self._alerts:
            yield Observation(value, labels)

    def _slo_value(self, field: str):
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for slo in self._slos:
                yield Observation(getattr(slo, field), {"slo": slo.name})

        return observe
