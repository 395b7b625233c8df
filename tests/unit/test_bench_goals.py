"""`make bench`'s reading of issue 12's goals (bench/goals.py) against a run's figures."""

import importlib
import sys
from pathlib import Path

# bench/ is a directory of the repository, not an installed package.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
goals = importlib.import_module("bench.goals")

# Session 21's runs, on a box slow at Python: two goals missed there by the structure, one by the box.
SESSION_21 = {
    "floor_rps": 3122.8,
    "create_vs_floor": 0.275,
    "telemetry_overhead": 1.085,
    "route_decision_vs_rpc": 0.0389,
    "cost_vs_oracle": 1.0158,
    "slo_attainment": 0.9901,
    "completed_jobs_per_s": 7.65,
    "rpcs_per_job": 8.39,
}


def test_each_goal_measured_is_met_or_missed_by_its_figures():
    read = goals.goals(SESSION_21)
    assert {name for name, goal in read.items() if not goal["met"]} == {
        "create_vs_floor",
        "completed_jobs_per_s",
        "route_decision_vs_rpc",
    }
    assert {name for name, goal in read.items() if goal["met"]} == {
        "telemetry_overhead",
        "cost_vs_oracle",
        "rpcs_per_job",
    }
    assert read["completed_jobs_per_s"]["figures"] == {"completed_jobs_per_s": 7.65, "floor_rps": 3122.8}
    summary = goals.summary(read)
    assert "MISSED create_vs_floor >= 0.5: create_vs_floor 0.275" in summary
    assert summary.endswith("3 of 6 goals met (3 not measured in this run)")


def test_a_goal_reads_all_its_figures():
    # On a box whose floor is 700 rps, 7.65 jobs a second meets floor_rps / 100.
    assert goals.goals({"completed_jobs_per_s": 7.65, "floor_rps": 700})["completed_jobs_per_s"]["met"]
    # A slower SLO misses the replay's goal however cheap; a lost job misses failover however fast.
    assert not goals.goals({"cost_vs_oracle": 1.0, "slo_attainment": 0.98})["cost_vs_oracle"]["met"]
    assert not goals.goals({"failover_p99_ms": 20.7, "jobs_lost": 1})["failover"]["met"]
    # 3,000 in flight (BENCH_INFLIGHT_JOBS) is not the goal's 10,000, all succeeded in little memory.
    small = {"inflight_jobs": 3000, "inflight_all_succeeded": True, "peak_rss_mb": 1200.0}
    assert not goals.goals(small)["inflight"]["met"]
    assert goals.goals({**small, "inflight_jobs": 10_000})["inflight"]["met"]
    assert not goals.goals({**small, "inflight_jobs": 10_000, "inflight_all_succeeded": False})["inflight"][
        "met"
    ]
    # Without the floor, the jobs' goal is not read at all.
    assert "completed_jobs_per_s" not in goals.goals({"completed_jobs_per_s": 50.0})
