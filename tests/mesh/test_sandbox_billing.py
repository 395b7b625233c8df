"""The renderers' charges against the sandbox's bills: for the same render (the same idempotency key),
what a renderer says the provider bills equals, to the micro-dollar, what the sandbox billed."""

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from helpers.sandbox import (
    FAST_PROVIDERS,
    TERMINAL,
    Sandbox,
    follow,
    renderer,
    sandbox_bills,
    shot,
    start,
)

from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.mesh import Mesh

BACKENDS = ("runway", "veo", "replicate")
# A length every backend's default model takes (Veo 4, 6 or 8 s; minimax/video-01 on Replicate 6 s).
SECONDS = {"runway": 4, "veo": 4, "replicate": 6}
DEADLINE = 60.0

T = TypeVar("T")


def _until(fetch: Callable[[], T], done: Callable[[T], bool]) -> T:
    """The first value fetched that is done; fails at the deadline."""
    deadline = time.monotonic() + DEADLINE
    while not done(value := fetch()):
        assert time.monotonic() < deadline, f"not reached; last seen: {value!r}"
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(
        tmp_path_factory.mktemp("billing"),
        free_ports=True,
        only=("sandbox", *(f"renderer-{backend}" for backend in BACKENDS)),
        environment=FAST_PROVIDERS,
    )
    running.start()
    yield running
    running.stop()


@pytest.fixture
def sandbox(mesh: Mesh) -> Sandbox:
    control = Sandbox(mesh.address("sandbox"))
    control.reset()
    return control


def _settled(sandbox: Sandbox, backend: str, key: str) -> int:
    """The sandbox's bill for that key, once the task behind it has ended and been billed."""
    return _until(lambda: sandbox_bills(sandbox.root, backend), lambda bills: key in bills.by_key).by_key[key]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outcome", ["succeeds", "fails", "refused"])
def test_a_renderers_charge_is_the_sandboxs_bill(
    mesh: Mesh, sandbox: Sandbox, backend: str, outcome: str
) -> None:
    prompt = {"succeeds": "a fox in the snow", "fails": "[sandbox:fail]", "refused": "[sandbox:safety]"}[
        outcome
    ]
    key = f"{backend}-{outcome}"
    stub = renderer(mesh, backend)
    final = follow(stub, start(stub, key, shot(prompt, seconds=SECONDS[backend])).handle.task_id)[-1]

    assert final.state in TERMINAL
    assert (final.state == renderer_pb2.RENDER_STATE_SUCCEEDED) == (outcome == "succeeds"), final.failure
    assert final.HasField("charge")
    assert final.charge.amount_micros == _settled(sandbox, backend, key)
    if outcome == "succeeds":
        assert final.charge.amount_micros > 0


@pytest.mark.parametrize("backend", ["runway", "replicate"])
def test_a_cancelled_renders_charge_is_the_sandboxs_bill(mesh: Mesh, sandbox: Sandbox, backend: str) -> None:
    key = f"{backend}-cancelled"
    stub = renderer(mesh, backend)
    started = start(stub, key, shot("[sandbox:never] a long one", seconds=SECONDS[backend]))
    _until(
        lambda: (
            stub.GetRender(renderer_pb2.GetRenderRequest(task_id=started.handle.task_id), timeout=10).render
        ),
        lambda render: render.state == renderer_pb2.RENDER_STATE_RUNNING,
    )
    stub.CancelRender(renderer_pb2.CancelRenderRequest(task_id=started.handle.task_id), timeout=30)
    final = follow(stub, started.handle.task_id)[-1]

    assert final.state == renderer_pb2.RENDER_STATE_CANCELLED
    # Runway bills a cancelled task in full, Replicate a canceled prediction not at all.
    assert final.charge.amount_micros == _settled(sandbox, backend, key)
    assert (final.charge.amount_micros > 0) == (backend == "runway")
