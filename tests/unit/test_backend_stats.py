"""The router's view of a backend: its figures follow every outcome recorded (computed once per
outcome, read at every routing decision)."""

import statistics

from aiprod_router.stats import SAME_LENGTH_RENDERS, WINDOW, BackendStats, Outcome


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


def test_a_clips_latency_is_judged_from_renders_of_its_length_once_there_are_enough():
    stats = BackendStats()
    for _ in range(SAME_LENGTH_RENDERS):
        stats.record(Outcome(True, 100.0, video_seconds=10))
    for _ in range(SAME_LENGTH_RENDERS - 1):
        stats.record(Outcome(True, 30.0, video_seconds=4))
    every = stats.percentile_seconds(95)
    assert stats.percentile_seconds(95, 10.0) == 100.0
    # Four 4 s clips are not enough to go by: all renders are.
    assert stats.percentile_seconds(95, 4.0) == every
    stats.record(Outcome(True, 30.0, video_seconds=4))
    assert stats.percentile_seconds(95, 4.0) == 30.0
    assert stats.percentile_seconds(95, 6.0) == stats.percentile_seconds(95) > 30.0
