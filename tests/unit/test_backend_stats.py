"""The router's view of a backend: its figures follow every outcome recorded (computed once per
outcome, read at every routing decision)."""

import statistics

from aiprod_router.stats import WINDOW, BackendStats, Outcome


def test_figures_follow_each_outcome_recorded():
    stats = BackendStats()
    assert (stats.percentile_seconds(95), stats.success_rate) == (None, None)
    stats.record(Outcome(True, 40.0))
    assert (stats.percentile_seconds(95), stats.success_rate) == (40.0, 1.0)
    durations = [40.0]
    for index in range(1, 30):
        seconds = 30.0 + (index * 7) % 50
        stats.record(Outcome(index % 5 != 0, seconds))
        if index % 5 != 0:
            durations.append(seconds)
        # Read after every outcome: never the figure of a window that has changed since.
        assert stats.percentile_seconds(95) == statistics.quantiles(durations, n=100, method="inclusive")[94]
        assert stats.percentile_seconds(50) == statistics.quantiles(durations, n=100, method="inclusive")[49]
        assert stats.success_rate == len(durations) / (index + 1)


def test_the_window_forgets_the_oldest_outcomes():
    stats = BackendStats()
    for _ in range(WINDOW):
        stats.record(Outcome(False, 1.0))
    assert stats.success_rate == 0.0 and stats.percentile_seconds(95) is None
    for _ in range(WINDOW):
        stats.record(Outcome(True, 10.0))
    assert stats.success_rate == 1.0 and stats.percentile_seconds(95) == 10.0
