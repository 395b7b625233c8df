"""The wait between two polls of a task: poll_seconds, half as long again each time up to
max_poll_seconds, and never longer than the time left that the task's progress implies."""

from aiprod.common.v1 import render_pb2
from aiprod_kit.rendering import polling
from aiprod_kit.rendering.polling import Poller
from aiprod_kit.rendering.record import ProviderRender


class Provider:
    name = "runway"


def poller() -> Poller:
    return Poller(Provider(), None, None, None, None, None, poll_seconds=2.0, max_poll_seconds=15.0)  # type: ignore[arg-type]


def test_the_wait_grows_by_half_up_to_the_most():
    render = ProviderRender("key", render_pb2.Shot(), "model", 2)
    waits = [poller()._next_wait(render) for _ in range(8)]
    assert waits == [2.0, 3.0, 4.5, 6.75, 10.125, 15.0, 15.0, 15.0]


def test_progress_cuts_the_wait_to_the_time_it_implies_is_left(monkeypatch):
    clock = iter([100.0, 120.0])
    monkeypatch.setattr(polling.time, "monotonic", lambda: next(clock))
    render = ProviderRender("key", render_pb2.Shot(), "model", 2)
    render.polls = 5  # the backoff alone would wait 15 s
    render.polling_since = 100.0
    at_start = poller()._next_wait(render)
    render.status.progress = 0.8  # 20 s for 80%: 5 s left
    assert (at_start, round(poller()._next_wait(render), 6)) == (15.0, 5.0)
