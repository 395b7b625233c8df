"""The background purge's rounds: the cutoff it asks for, its batches, and a retention of 0."""

from aiprod_kit.retention import Retention, duration


class Kept:
    """A store holding `count` things past any cutoff; records the purges asked of it."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.asked: list[tuple[float, int]] = []

    async def purge(self, before: float, limit: int) -> int:
        self.asked.append((before, limit))
        deleted = min(limit, self.count)
        self.count -= deleted
        return deleted


async def test_a_round_purges_batches_before_now_less_the_retention_until_one_comes_back_short():
    kept = Kept(25)
    retention = Retention("things", kept.purge, 3600.0, batch=10, clock=lambda: 100_000.0)
    assert await retention.purge_once() == 25
    assert kept.asked == [(96_400.0, 10)] * 3
    assert await retention.purge_once() == 0  # nothing left: one batch asked
    assert len(kept.asked) == 4


async def test_a_round_stops_after_its_cap_of_batches():
    kept = Kept(10_000)
    assert await Retention("things", kept.purge, 1.0, batch=1).purge_once() == 100
    assert kept.count == 9_900


async def test_a_retention_of_zero_keeps_everything():
    kept = Kept(5)
    retention = Retention("things", kept.purge, 0.0)
    assert await retention.purge_once() == 0
    await retention.start()
    await retention.stop()
    assert kept.asked == [] and kept.count == 5


def test_a_retention_is_told_in_days_when_it_is_whole_days():
    assert [duration(s) for s in (86_400.0, 30 * 86_400.0, 1.0, 129_600.0)] == [
        "1 day",
        "30 days",
        "1 s",
        "129600 s",
    ]
