"""Money as exact micro-units."""

from aiprod.common.v1 import money_pb2
from aiprod.metrics.v1 import metrics_pb2

MICROS_PER_UNIT = 1_000_000


def usd(amount_micros: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="USD", amount_micros=amount_micros)


def usd_from_units(amount: float) -> money_pb2.Money:
    return usd(round(amount * MICROS_PER_UNIT))


def budget_level_name(level: int) -> str:
    """A budget level as people read it: "ok", "notify", "economy", "exhausted"."""
    return metrics_pb2.BudgetLevel.Name(level).removeprefix("BUDGET_LEVEL_").lower()
