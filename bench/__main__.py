"""`make bench`: starts the mesh on free ports and measures, in one run, the floor (a bare grpc.aio
unary call: the gateway's health Check) and CreateRenderJob, both at concurrency 32, and how fast the
router stops routing to a renderer that turns NOT_SERVING (goal: 100 ms). Prints one JSON object as
its last line.

Routing, in-process (bench/replay.py): `route_decision_vs_rpc` is the router's time per decision (the
views it builds from its stats, then the policy's ranking, over four backends with full stats windows)
over one bare round trip (the floor's call, one at a time, so that no queueing is in it); the replay of
1,000 seeded jobs gives `cost_vs_oracle`, `slo_attainment` and `seed_policy_cost_vs_oracle`.

Jobs are created under an approval preset so that they wait instead of rendering: the figure is the
cost of the RPC (API key, validation, quote, idempotency, the job store), not of the renders it would
start. The development tenant's tier limits are lifted: the bench measures the path, not the limiter's
refusals.
"""

import asyncio
import json
import signal
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiprod.common.v1 import render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.apikeys import aio_interceptors
from aiprod_kit.mesh import Mesh
from bench import replay

CONCURRENCY = 32
WARMUP_CALLS = 200
MEASURED_SECONDS = 5.0
REACTION_LIMIT_SECONDS = 10.0
ROUND_TRIP_CALLS = 2000
DECISIONS = 20_000


async def measure(call: Callable[[], Awaitable[object]]) -> dict[str, float]:
    """Runs call from CONCURRENCY workers for MEASURED_SECONDS; returns requests per second and p99."""
    for _ in range(WARMUP_CALLS // CONCURRENCY):
        await asyncio.gather(*(call() for _ in range(CONCURRENCY)))
    latencies: list[float] = []
    deadline = time.perf_counter() + MEASURED_SECONDS

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


async def round_trip_seconds(call: Callable[[], Awaitable[object]]) -> float:
    """The mean of one call at a time: a round trip, without the queueing of the concurrent floor."""
    for _ in range(WARMUP_CALLS):
        await call()
    started = time.perf_counter()
    for _ in range(ROUND_TRIP_CALLS):
        await call()
    return (time.perf_counter() - started) / ROUND_TRIP_CALLS


def decision_seconds() -> float:
    """The mean time of the router's decision (RenderChain.rank's work) over varied jobs."""
    policy, requests = replay.decision_inputs()
    for request in requests:  # warm-up
        policy.rank(request)
    started = time.perf_counter()
    for index in range(DECISIONS):
        policy.rank(requests[index % len(requests)])
    return (time.perf_counter() - started) / DECISIONS


async def run(address: str, api_key: str) -> dict[str, float]:
    async with (
        grpc.aio.insecure_channel(address) as channel,
        grpc.aio.insecure_channel(address, interceptors=aio_interceptors(api_key)) as keyed,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        gateway = gateway_pb2_grpc.GatewayServiceStub(keyed)
        check = health_pb2.HealthCheckRequest(service="aiprod.gateway.v1.GatewayService")
        # One shot (8 s): the preset's own 120 s would be a 15-shot film, another figure (create_film_rps).
        spec = render_pb2.RenderSpec(
            prompt="A benchmark of job creation", preset="brand_campaign", duration_seconds=8
        )

        floor = await measure(lambda: health.Check(check))
        round_trip = await round_trip_seconds(lambda: health.Check(check))
        create = await measure(
            lambda: gateway.CreateRenderJob(
                gateway_pb2.CreateRenderJobRequest(request_id=uuid.uuid4().hex, spec=spec)
            )
        )
    return {
        "floor_rps": round(floor["rps"], 1),
        "floor_p99_ms": round(floor["p99_ms"], 2),
        "create_rps": round(create["rps"], 1),
        "create_p99_ms": round(create["p99_ms"], 2),
        "create_vs_floor": round(create["rps"] / floor["rps"], 3),
        "concurrency": CONCURRENCY,
        "rpc_round_trip_us": round(round_trip * 1e6, 1),
    }


async def health_reaction_ms(mesh: Mesh) -> float:
    """From the renderer's SIGTERM (its health turns NOT_SERVING at once, then it drains) to the router
    reporting the backend NOT_SERVING: the router's whole reaction, pushed by health Watch."""
    async with grpc.aio.insecure_channel(mesh.address("router")) as channel:
        router = router_pb2_grpc.RouterServiceStub(channel)
        request = router_pb2.ListBackendsRequest()
        started = time.perf_counter()
        mesh.services["renderer-local"].process.send_signal(signal.SIGTERM)
        while time.perf_counter() - started < REACTION_LIMIT_SECONDS:
            backends = (await router.ListBackends(request)).backends
            if all(status.health == router_pb2.BACKEND_HEALTH_NOT_SERVING for status in backends):
                return (time.perf_counter() - started) * 1000
    return float("inf")


def main() -> None:
    # In-process figures first, while nothing else of the bench uses the CPU.
    decision = decision_seconds()
    routing = replay.replay()
    with tempfile.TemporaryDirectory(prefix="aiprod-bench-") as data_dir:
        # A long drain keeps the renderer NOT_SERVING but up while the router's reaction is measured.
        unlimited = {"GOLD": {"concurrent_jobs": 10**9, "requests_per_minute": 10**9}}
        environment = {"AIPROD_SHUTDOWN_GRACE_SECONDS": "10", "AIPROD_GATEWAY_TIERS": json.dumps(unlimited)}
        mesh = Mesh(Path(data_dir), free_ports=True, environment=environment)
        mesh.start()
        try:
            figures = asyncio.run(run(mesh.address("gateway"), mesh.api_key))
            figures["router_health_reaction_ms"] = round(asyncio.run(health_reaction_ms(mesh)), 1)
        finally:
            mesh.stop()
    figures["route_decision_us"] = round(decision * 1e6, 1)
    figures["route_decision_vs_rpc"] = round(decision / (figures["rpc_round_trip_us"] / 1e6), 4)
    figures.update(routing)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
