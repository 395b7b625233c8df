"""Helpers for tests of a provider renderer against the sandbox: its control API, the renderer's
stub, and waiting on render and health streams."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiprod.common.v1 import event_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.mesh import PROVIDER_BACKENDS, Mesh
from helpers.mesh import budget, eventually

RENDERER_SERVICE = "aiprod.renderer.v1.RendererService"
# Sandbox renders of a second, polled five times a second: mesh tests wait seconds, not minutes.
FAST_PROVIDERS = {
    "AIPROD_SANDBOX_RENDER_SECONDS": "1",
    "AIPROD_RUNWAY_POLL_SECONDS": "0.2",
    "AIPROD_VEO_POLL_SECONDS": "0.2",
    "AIPROD_REPLICATE_POLL_SECONDS": "0.2",
}
TERMINAL = {
    renderer_pb2.RENDER_STATE_SUCCEEDED,
    renderer_pb2.RENDER_STATE_FAILED,
    renderer_pb2.RENDER_STATE_CANCELLED,
}


def provider_settings(**values: str) -> dict[str, str]:
    """AIPROD_<PROVIDER>_<NAME> for every provider renderer."""
    return {
        f"AIPROD_{backend.upper()}_{name}": value
        for backend in PROVIDER_BACKENDS
        for name, value in values.items()
    }


@contextmanager
def sandbox_mesh(data_dir: Path, environment: dict[str, str]) -> Iterator[Mesh]:
    """The whole mesh with every provider renderer against the sandbox (fast, unless environment says
    otherwise), stopped on the way out."""
    running = Mesh(data_dir, free_ports=True, sandbox=True, environment={**FAST_PROVIDERS, **environment})
    running.start()
    try:
        yield running
    finally:
        running.stop()


def settled_sandbox(mesh: Mesh, settle_seconds: float) -> "Sandbox":
    """The mesh's sandbox, reset (renders of a second) once the ledger holds nothing in flight from
    earlier tests, whose settlements would otherwise land in the next test's figures."""
    assert eventually(lambda: budget(mesh).reserved.amount_micros == 0, timeout=settle_seconds)
    control = Sandbox(mesh.address("sandbox"))
    control.reset(render_seconds=1)
    return control


@dataclass(frozen=True)
class Accounting:
    """Attempts against a sandbox's bill: the ones whose charge is not their key's bill (or, held, whose
    reservation is under it), and what the held ones were billed and keep reserved."""

    wrong: list[tuple]
    held_billed: int
    held_reserved: int


def account(attempts: dict[str, tuple[str, Any]], bills: "Bills") -> Accounting:
    """attempts: reservation key -> (job id, gateway RenderAttempt). Each settled attempt's charge must
    be what its provider billed for its key; a held one (its outcome unknown) keeps at least its bill
    reserved."""
    wrong: list[tuple] = []
    held_billed = held_reserved = 0
    for key, (job_id, attempt) in attempts.items():
        billed = bills.by_key.get(key, 0)
        if attempt.charge.outcome == event_pb2.CHARGE_OUTCOME_HOLD:
            held_billed += billed
            held_reserved += attempt.reserved.amount_micros
            if attempt.reserved.amount_micros < billed:
                wrong.append((job_id, key, "held under its bill", attempt.reserved.amount_micros, billed))
        elif attempt.charge.billed.amount_micros != billed:
            wrong.append((job_id, key, "charged", attempt.charge.billed.amount_micros, "billed", billed))
    return Accounting(wrong, held_billed, held_reserved)


class Sandbox:
    """The sandbox's control API."""

    def __init__(self, address: str) -> None:
        self.root = f"http://{address}"
        self._http = httpx.Client(base_url=self.root, timeout=10)

    def reset(self, **config: object) -> None:
        self._http.post("/_sandbox/reset").raise_for_status()
        if config:
            self._http.post("/_sandbox/config", json=config).raise_for_status()

    def configure(self, **config: object) -> None:
        """Changes the configuration in force (of one provider when `provider` is given)."""
        self._http.post("/_sandbox/config", json=config).raise_for_status()

    def fault(self, provider: str, operation: str, kind: str, **options: object) -> None:
        rule = {"provider": provider, "operation": operation, "kind": kind, **options}
        self._http.post("/_sandbox/faults", json=rule).raise_for_status()

    def counters(self) -> dict:
        return self._http.get("/_sandbox/counters").json()

    def creates(self, provider: str) -> dict[str, int]:
        return self.counters()["creates"].get(provider, {})

    def bills(self, provider: str | None = None) -> "Bills":
        """What the sandbox billed so far, for one provider or all of them."""
        return bills_of(self.counters(), provider)


@dataclass(frozen=True)
class Bills:
    """A sandbox's bills in micro-USD: the total, and per idempotency key (the sum of that key's
    tasks: a create sent twice is billed twice). Only tasks in their final state are billed."""

    total_micros: int
    by_key: dict[str, int]
    # task id -> {"micros", "state", "key", "model"}, as the sandbox reports them.
    tasks: dict[str, dict]


def bills_of(counters: dict, provider: str | None = None) -> Bills:
    """The bills in a `/_sandbox/counters` answer, for one provider or all of them."""
    providers = [provider] if provider else list(counters["billing"])
    tasks = {task_id: bill for name in providers for task_id, bill in counters["billing"][name].items()}
    by_key: dict[str, int] = {}
    for bill in tasks.values():
        by_key[bill["key"]] = by_key.get(bill["key"], 0) + bill["micros"]
    total = counters["billed_total_micros"][provider] if provider else counters["billed_total_micros_all"]
    return Bills(total, by_key, tasks)


def sandbox_bills(root: str, provider: str | None = None) -> Bills:
    """The bills of the sandbox at `root` (http://host:port), for one provider or all of them."""
    response = httpx.get(f"{root}/_sandbox/counters", timeout=10)
    response.raise_for_status()
    return bills_of(response.json(), provider)


def shot(prompt: str = "A fox running through snow", seconds: float = 4, **fields: object) -> render_pb2.Shot:
    return render_pb2.Shot(
        prompt=prompt, duration_seconds=seconds, aspect_ratio=render_pb2.ASPECT_RATIO_16_9, **fields
    )


def renderer(mesh: Mesh, backend: str) -> renderer_pb2_grpc.RendererServiceStub:
    return renderer_pb2_grpc.RendererServiceStub(grpc.insecure_channel(mesh.address(f"renderer-{backend}")))


def start(
    stub: renderer_pb2_grpc.RendererServiceStub, key: str, the_shot: render_pb2.Shot
) -> renderer_pb2.Render:
    return stub.StartRender(
        renderer_pb2.StartRenderRequest(idempotency_key=key, shot=the_shot), timeout=60
    ).render


def follow(
    stub: renderer_pb2_grpc.RendererServiceStub, task_id: str, timeout: float = 120
) -> list[renderer_pb2.Render]:
    """Every status WatchRender sends, up to the final one."""
    request = renderer_pb2.WatchRenderRequest(task_id=task_id)
    return [message.render for message in stub.WatchRender(request, timeout=timeout)]


@contextmanager
def health_watch(mesh: Mesh, backend: str) -> Iterator[Iterator[int]]:
    """The renderer's own health statuses, as grpc.health.v1 Watch pushes them."""
    channel = grpc.insecure_channel(mesh.address(f"renderer-{backend}"))
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=RENDERER_SERVICE), timeout=120
    )
    try:
        yield (response.status for response in stream)
    finally:
        stream.cancel()
        channel.close()


def wait_for_status(statuses: Iterator[int], wanted: int) -> None:
    for status in statuses:
        if status == wanted:
            return
    raise AssertionError("the health stream ended first")


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
