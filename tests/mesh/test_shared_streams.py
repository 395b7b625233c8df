"""The mesh's shared streams, called as the gateway and the router call them, on real processes:
ExecuteRenders runs many renders at the router over one stream, each as its own ExecuteRender call
would (its events, then its end with the call's status and details), and WatchRenders follows many
renders at a renderer, each as WatchRender would. A render that is refused ends alone; the stream
serves the others.
"""

import uuid
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import status_pb2
from helpers.mesh import error_info, field_violations, start_mesh

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.errors import rpc_error
from aiprod_kit.mesh import Mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = start_mesh(tmp_path_factory.mktemp("streams"))
    try:
        yield running
    finally:
        running.stop()


def shot(prompt: str = "A kite over the dunes") -> render_pb2.Shot:
    return render_pb2.Shot(prompt=prompt, duration_seconds=1, aspect_ratio=render_pb2.ASPECT_RATIO_16_9)


def execute(render_id: str, prompt: str = "A kite over the dunes") -> router_pb2.ExecuteRendersRequest:
    request = router_pb2.ExecuteRenderRequest(
        job_id=f"job_{uuid.uuid4().hex}", shot=shot(prompt), idempotency_key=f"streams-{uuid.uuid4().hex}"
    )
    return router_pb2.ExecuteRendersRequest(render_id=render_id, execute=request)


def test_execute_renders_runs_each_render_as_its_own_call_and_ends_each_with_its_status(mesh: Mesh):
    router = router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(mesh.address("router")))
    requests = [
        execute("good"),
        execute("empty-prompt", prompt=""),
        router_pb2.ExecuteRendersRequest(render_id="no-action"),
        execute("also-good"),
    ]
    events: dict[str, list[str]] = {}
    ends: dict[str, router_pb2.CallEnd] = {}
    # The caller closes its side after its requests: the stream ends once every render has ended.
    for response in router.ExecuteRenders(iter(requests), timeout=120):
        assert response.render_id not in ends, "news after a render's end"
        if response.HasField("event"):
            events.setdefault(response.render_id, []).append(response.event.WhichOneof("kind"))
        else:
            ends[response.render_id] = response.end
    assert set(ends) == {"good", "empty-prompt", "no-action", "also-good"}
    for render_id in ("good", "also-good"):
        assert ends[render_id].code == grpc.StatusCode.OK.value[0]
        assert events[render_id][0] == "routed" and events[render_id][-1] == "succeeded", events[render_id]
    # A refused render ends with the status its own call would have had, details and all.
    refused = ends["empty-prompt"]
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "empty-prompt" not in events
    error = rpc_error(status_pb2.Status.FromString(refused.status_details))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.message == error.details()
    assert "shot.prompt" in field_violations(error)
    assert error_info(error).reason == "INVALID_ARGUMENT"
    assert ends["no-action"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "action" in ends["no-action"].message


def test_a_render_stopped_on_the_stream_sends_nothing_more(mesh: Mesh):
    router = router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(mesh.address("router")))
    stopped = router_pb2.ExecuteRendersRequest(render_id="first", stop=True)
    seen = [
        response.render_id
        for response in router.ExecuteRenders(iter([execute("first"), stopped]), timeout=60)
    ]
    # Stopped at once: at most what was sent before the stop was read, and never its end.
    assert seen.count("first") <= 1


def test_watch_renders_follows_many_renders_at_a_renderer(mesh: Mesh):
    renderer = renderer_pb2_grpc.RendererServiceStub(grpc.insecure_channel(mesh.address("renderer-local")))
    task_ids = []
    for _ in range(3):
        request = renderer_pb2.StartRenderRequest(idempotency_key=f"watch-{uuid.uuid4().hex}", shot=shot())
        task_ids.append(renderer.StartRender(request, timeout=30).render.handle.task_id)
    watch = renderer_pb2.WatchRendersRequest(
        watch=[renderer_pb2.RenderToWatch(task_id=task_id) for task_id in [*task_ids, "local_unknown"]]
    )
    statuses: dict[str, list[int]] = {}
    errors: dict[str, renderer_pb2.WatchError] = {}
    for response in renderer.WatchRenders(iter([watch]), timeout=120):
        if response.HasField("error"):
            errors[response.task_id] = response.error
        else:
            statuses.setdefault(response.task_id, []).append(response.render.state)
    assert set(statuses) == set(task_ids)
    for states in statuses.values():
        assert states[-1] == renderer_pb2.RENDER_STATE_SUCCEEDED, states
        assert renderer_pb2.RENDER_STATE_SUCCEEDED not in states[:-1]
    assert set(errors) == {"local_unknown"}
    assert errors["local_unknown"].code == grpc.StatusCode.NOT_FOUND.value[0]
