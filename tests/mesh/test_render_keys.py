"""Durable render keys: a key is created once at the provider across renderer restarts and replicas,
an uncertain create is never sent again, and a StartRender its caller gave up on frees its slot and
its key. The Runway renderer against the sandbox, as processes; replicas share the data directory."""

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from helpers.sandbox import SERVING, Sandbox, follow, health_watch, renderer, shot, start, wait_for_status

from aiprod.common.v1 import backend_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.database import SqliteDatabase
from aiprod_kit.failures import Reason
from aiprod_kit.mesh import Mesh
from aiprod_kit.rendering.keys import RenderKeyStore

SUCCEEDED = renderer_pb2.RENDER_STATE_SUCCEEDED
FAILED = renderer_pb2.RENDER_STATE_FAILED
REPLICA = "renderer-runway@127.0.0.2"
ENVIRONMENT = {
    "AIPROD_RUNWAY_POLL_SECONDS": "0.2",
    "AIPROD_RUNWAY_REQUEST_TIMEOUT_SECONDS": "10",
    "AIPROD_RUNWAY_BREAKER_FAILURES": "100",
}
# gen4.5 bills 12 credits (0.12 USD) a second.
TWO_SECONDS = 2 * 120_000


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(
        tmp_path_factory.mktemp("keys"),
        free_ports=True,
        only=("sandbox", "renderer-runway"),
        environment=ENVIRONMENT,
    )
    running.start()
    try:
        running.start_replica("renderer-runway", "127.0.0.2")
        yield running
    finally:
        running.stop()


@pytest.fixture
def sandbox(mesh: Mesh) -> Sandbox:
    control = Sandbox(mesh.address("sandbox"))
    control.reset(render_seconds=1)
    return control


def replica(mesh: Mesh) -> renderer_pb2_grpc.RendererServiceStub:
    return renderer_pb2_grpc.RendererServiceStub(grpc.insecure_channel(mesh.address(REPLICA)))


def restart(mesh: Mesh) -> renderer_pb2_grpc.RendererServiceStub:
    """SIGKILLs the first replica and starts it again; its stub once it serves."""
    mesh.kill("renderer-runway")
    mesh.start_service("renderer-runway")
    with health_watch(mesh, "runway") as statuses:
        wait_for_status(statuses, SERVING)
    return renderer(mesh, "runway")


def test_a_start_repeated_after_a_sigkill_returns_the_same_task(mesh: Mesh, sandbox: Sandbox) -> None:
    sandbox.reset(render_seconds=2)
    first = start(renderer(mesh, "runway"), "kill-1", shot(seconds=2))
    stub = restart(mesh)
    again = start(stub, "kill-1", shot(seconds=2))
    assert again.handle.task_id == first.handle.task_id
    assert again.model == "gen4.5"
    final = follow(stub, first.handle.task_id)[-1]
    assert final.state == SUCCEEDED, final.failure
    assert final.charge.amount_micros == TWO_SECONDS
    assert sandbox.creates("runway") == {"kill-1": 1}


def test_an_ended_render_is_answered_the_same_once_the_provider_forgot_it(
    mesh: Mesh, sandbox: Sandbox
) -> None:
    stub = renderer(mesh, "runway")
    task_id = start(stub, "forgotten-1", shot(seconds=2)).handle.task_id
    final = follow(stub, task_id)[-1]
    assert final.state == SUCCEEDED, final.failure
    stub = restart(mesh)
    sandbox.reset()  # the sandbox forgets every task, as Replicate does its outputs after an hour
    for answer in (
        start(stub, "forgotten-1", shot(seconds=2)),
        stub.GetRender(renderer_pb2.GetRenderRequest(task_id=task_id)).render,
        replica(mesh).GetRender(renderer_pb2.GetRenderRequest(task_id=task_id)).render,
    ):
        assert answer.state == SUCCEEDED
        assert answer.output == final.output
        assert answer.charge == final.charge
    assert sandbox.counters()["create_requests"].get("runway", {}) == {}


def test_the_same_key_on_a_second_replica_returns_the_same_task(mesh: Mesh, sandbox: Sandbox) -> None:
    first = start(renderer(mesh, "runway"), "replica-1", shot(seconds=2))
    again = start(replica(mesh), "replica-1", shot(seconds=2))
    assert again.handle.task_id == first.handle.task_id
    final = follow(replica(mesh), first.handle.task_id)[-1]
    assert final.state == SUCCEEDED, final.failure
    assert sandbox.creates("runway") == {"replica-1": 1}


def test_replicas_racing_on_one_key_create_it_once(mesh: Mesh, sandbox: Sandbox) -> None:
    # The first create is held a second at the provider: the other replica meets the key mid-create
    # and waits for its task id.
    sandbox.fault("runway", "create", "hang", times=1, hang_seconds=1)
    stubs = [renderer(mesh, "runway"), replica(mesh)]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda stub: start(stub, "race-1", shot(seconds=2)), stubs))
    assert answers[0].handle.task_id and answers[0].handle.task_id == answers[1].handle.task_id
    assert sandbox.creates("runway") == {"race-1": 1}
    assert sandbox.counters()["create_requests"]["runway"] == {"race-1": 1}


def test_an_intent_without_a_task_id_is_uncertain_and_never_sent(mesh: Mesh, sandbox: Sandbox) -> None:
    # A replica that crashed between its create and the record: the intent alone, claimed long ago.
    async def crashed_replica() -> None:
        database = SqliteDatabase(mesh.data_dir / "renderers" / "runway-keys.sqlite3", "crashed")
        store = await RenderKeyStore.open(database, backend_pb2.BACKEND_RUNWAY, owner="crashed")
        await store.claim("crashed-1", "gen4.5", shot(seconds=2), now=time.time() - 3600)
        await store.close()

    asyncio.run(crashed_replica())
    for stub in (renderer(mesh, "runway"), replica(mesh)):
        answer = start(stub, "crashed-1", shot(seconds=2))
        assert answer.state == FAILED
        assert answer.failure.reason == Reason.PROVIDER_UNCERTAIN and not answer.failure.retryable
        assert not answer.HasField("charge")
    assert sandbox.counters()["create_requests"].get("runway", {}) == {}


def test_a_create_whose_answer_was_lost_stays_uncertain_after_a_restart(mesh: Mesh, sandbox: Sandbox) -> None:
    sandbox.fault("runway", "create", "drop", times=1, phase="after")
    answer = start(renderer(mesh, "runway"), "dropped-1", shot(seconds=2))
    assert answer.failure.reason == Reason.PROVIDER_UNCERTAIN
    assert not answer.HasField("charge")
    again = start(restart(mesh), "dropped-1", shot(seconds=2))
    assert again.state == FAILED and again.failure.reason == Reason.PROVIDER_UNCERTAIN
    assert start(replica(mesh), "dropped-1", shot(seconds=2)).failure.reason == Reason.PROVIDER_UNCERTAIN
    assert sandbox.counters()["create_requests"]["runway"] == {"dropped-1": 1}


# One task slot -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(
        tmp_path_factory.mktemp("one-slot"),
        free_ports=True,
        only=("sandbox", "renderer-runway"),
        environment={
            **ENVIRONMENT,
            "AIPROD_RUNWAY_MAX_CONCURRENT_TASKS": "1",
            # A slot that leaked shows as RESOURCE_EXHAUSTED within this.
            "AIPROD_RUNWAY_SLOT_WAIT_SECONDS": "5",
        },
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _given_up(stub: renderer_pb2_grpc.RendererServiceStub, key: str) -> None:
    """A StartRender whose caller goes away after half a second (a client rolled out, say)."""
    request = renderer_pb2.StartRenderRequest(idempotency_key=key, shot=shot(seconds=2))
    with pytest.raises(grpc.RpcError) as caught:
        stub.StartRender(request, timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_start_given_up_while_waiting_for_a_slot_frees_its_slot_and_key(one_slot: Mesh) -> None:
    sandbox = Sandbox(one_slot.address("sandbox"))
    sandbox.reset(render_seconds=1)
    stub = renderer(one_slot, "runway")
    holder = start(stub, "slot-holder", shot("[sandbox:never] holds the slot", seconds=2))
    _given_up(stub, "slot-waiter")
    cancelled = stub.CancelRender(renderer_pb2.CancelRenderRequest(task_id=holder.handle.task_id)).render
    assert cancelled.charge.amount_micros == TWO_SECONDS  # Runway keeps a cancelled task's credits
    # The slot went to nobody: a new render starts at once, then the given-up key starts afresh.
    for key in ("slot-next", "slot-waiter"):
        final = follow(stub, start(stub, key, shot(seconds=2)).handle.task_id)[-1]
        assert final.state == SUCCEEDED, final.failure
    assert sandbox.creates("runway") == {"slot-holder": 1, "slot-next": 1, "slot-waiter": 1}


def test_a_start_given_up_mid_create_records_its_task_and_frees_its_slot(one_slot: Mesh) -> None:
    sandbox = Sandbox(one_slot.address("sandbox"))
    sandbox.reset(render_seconds=1)
    # The create is held two seconds at Runway, then created: its caller has gone by then.
    sandbox.fault("runway", "create", "hang", times=1, hang_seconds=2)
    stub = renderer(one_slot, "runway")
    _given_up(stub, "mid-create")
    again = start(stub, "mid-create", shot(seconds=2))
    assert again.handle.task_id
    assert follow(stub, again.handle.task_id)[-1].state == SUCCEEDED
    final = follow(stub, start(stub, "after-mid-create", shot(seconds=2)).handle.task_id)[-1]
    assert final.state == SUCCEEDED, final.failure
    assert sandbox.creates("runway") == {"mid-create": 1, "after-mid-create": 1}


def test_the_key_store_lives_in_the_data_directory(one_slot: Mesh) -> None:
    assert Path(one_slot.data_dir / "renderers" / "runway-keys.sqlite3").is_file()
