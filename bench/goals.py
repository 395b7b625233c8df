"""Issue 12's goals read against a run's figures: `make bench` says of each goal whose figures it has
what it asks and whether the run met it, so that a run tells where it stands on its own."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Figures = Mapping[str, Any]


@dataclass(frozen=True)
class Goal:
    name: str
    # What it asks, as people read it.
    asks: str
    # The figures it reads: a run without one of them says nothing of the goal.
    reads: tuple[str, ...]
    met: Callable[[Figures], bool]


GOALS = (
    Goal(
        "create_vs_floor",
        "create_vs_floor >= 0.5",
        ("create_vs_floor",),
        lambda f: f["create_vs_floor"] >= 0.5,
    ),
    Goal(
        "completed_jobs_per_s",
        "completed_jobs_per_s >= floor_rps / 100",
        ("completed_jobs_per_s", "floor_rps"),
        lambda f: f["completed_jobs_per_s"] >= f["floor_rps"] / 100,
    ),
    Goal("rpcs_per_job", "rpcs_per_job <= 12", ("rpcs_per_job",), lambda f: f["rpcs_per_job"] <= 12),
    Goal(
        "inflight",
        "10,000 jobs in flight, all succeeded, peak_rss_mb <= 2048",
        ("inflight_jobs", "inflight_all_succeeded", "peak_rss_mb"),
        lambda f: f["inflight_jobs"] >= 10_000 and f["inflight_all_succeeded"] and f["peak_rss_mb"] <= 2048,
    ),
    Goal(
        "failover",
        "failover_p99_ms <= 100 with no job lost",
        ("failover_p99_ms", "jobs_lost"),
        lambda f: f["failover_p99_ms"] <= 100 and f["jobs_lost"] == 0,
    ),
    Goal(
        "route_decision_vs_rpc",
        "route_decision_vs_rpc <= 0.02",
        ("route_decision_vs_rpc",),
        lambda f: f["route_decision_vs_rpc"] <= 0.02,
    ),
    Goal(
        "telemetry_overhead",
        "telemetry_overhead <= 1.1",
        ("telemetry_overhead",),
        lambda f: f["telemetry_overhead"] <= 1.1,
    ),
    Goal(
        "provider_requests_per_job",
        "provider_requests_per_job <= 15",
        ("provider_requests_per_job",),
        lambda f: f["provider_requests_per_job"] <= 15,
    ),
    Goal(
        "cost_vs_oracle",
        "cost_vs_oracle <= 1.05 with slo_attainment >= 0.99",
        ("cost_vs_oracle", "slo_attainment"),
        lambda f: f["cost_vs_oracle"] <= 1.05 and f["slo_attainment"] >= 0.99,
    ),
)


def goals(figures: Figures) -> dict[str, dict[str, Any]]:
    """Each goal whose figures the run has, by name: what it asks, the figures it read, whether met."""
    read = {}
    for goal in GOALS:
        if all(name in figures for name in goal.reads):
            read[goal.name] = {
                "asks": goal.asks,
                "figures": {name: figures[name] for name in goal.reads},
                "met": goal.met(figures),
            }
    return read


def summary(read: Mapping[str, Mapping[str, Any]]) -> str:
    """A line a goal, then how many were met."""
    lines = [
        f"{'met   ' if goal['met'] else 'MISSED'} {goal['asks']}: "
        + ", ".join(f"{name} {value}" for name, value in goal["figures"].items())
        for goal in read.values()
    ]
    met = sum(goal["met"] for goal in read.values())
    lines.append(f"{met} of {len(read)} goals met ({len(GOALS) - len(read)} not measured in this run)")
    return "\n".join(lines)
