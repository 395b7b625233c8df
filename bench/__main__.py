"""`make bench` (`python -m bench [scenario ...]`): starts the mesh on free ports, as processes, and
measures it; prints one JSON object, every figure from the same run on the same machine, as its last
line (and each scenario's time on stderr). docs/performance.md records a run and reads it.

- routing (in-process, first, while nothing else uses the CPU; bench/replay.py): the router's time per
  decision (`route_decision_us`; over `rpc_round_trip_us`, one bare round trip: `route_decision_vs_rpc`)
  and the replay of 1,000 seeded jobs: `cost_vs_oracle`, `slo_attainment`, `seed_policy_cost_vs_oracle`.
- create: the floor (a bare grpc.aio unary call, the gateway's health Check) and CreateRenderJob, both
  at concurrency 32, with telemetry exported over OTLP as deployed (`create_rps`), without
  (`telemetry_overhead`: off over on) and on PostgreSQL (`create_rps_postgres`). Jobs are created under
  an approval preset so that they wait instead of rendering: the figure is the cost of the RPC (API
  key, validation, quote, idempotency, the job store), not of the renders it would start.
- throughput, provider_requests, inflight (bench/jobs.py): jobs through the mesh and the provider
  sandbox: jobs finished a second and what each costs; provider requests per job; 10,000 in flight
  (BENCH_INFLIGHT_JOBS) and the mesh's peak memory.
- failover (bench/failover.py): the router's reaction to a renderer killed or stopped, 20 trials, and
  the jobs lost meanwhile.

The development tenant's tier limits are lifted: the bench measures the mesh, not the limiter. Last,
each of issue 12's goals whose figures the run has is read against them (bench/goals.py): a line each
on stderr, met or missed, and `goals` in the JSON.
"""

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiprod.common.v1 import render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod_kit.apikeys import aio_interceptors
from aiprod_kit.mesh import Mesh
from bench import failover, goals, jobs, replay
from bench.otlp import MetricTotals

CONCURRENCY = 32
WARMUP_CALLS = 200
MEASURED_SECONDS = 5.0
ROUND_TRIP_CALLS = 2000
DECISIONS = 20_000
# Telemetry on and off, alternated this many times (accept_path).
TELEMETRY_PAIRS = 5


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


def create_figures(environment: dict[str, str]) -> dict[str, float]:
    """The floor and CreateRenderJob on a plain mesh (SQLite unless environment says otherwise)."""
    with tempfile.TemporaryDirectory(prefix="aiprod-bench-") as data_dir:
        mesh = Mesh(Path(data_dir), free_ports=True, environment={**jobs.UNLIMITED, **environment})
        mesh.start()
        try:
            return asyncio.run(run(mesh.address("gateway"), mesh.api_key))
        finally:
            mesh.stop()


@contextlib.contextmanager
def postgres_database() -> Iterator[dict[str, str]]:
    """AIPROD_DATABASE_URL on a fresh schema of the local PostgreSQL (AIPROD_TEST_POSTGRES_URL, as the
    tests), dropped afterwards."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers.postgres import fresh_schema

    with fresh_schema() as url:
        yield {"AIPROD_DATABASE_URL": url}


def accept_path() -> dict[str, object]:
    """The floor, and CreateRenderJob with telemetry exported (the figure), without it
    (`telemetry_overhead`), and on PostgreSQL.

    On and off alternate TELEMETRY_PAIRS times: this box's speed drifts by a third from one minute to
    the next, more than the overhead measured, so one pair says little. The figures are the median
    pair's (by its on run), the overhead the median of the pairs' ratios, each pair's kept."""
    pairs = []
    for _ in range(TELEMETRY_PAIRS):
        # Telemetry exported as deployed: nothing here counts on the exports (the 500 ms metric
        # interval the counting scenarios use would be a bench's cost, not the product's).
        with MetricTotals() as totals:
            on = create_figures(totals.deployed_environment)
        off = create_figures({"AIPROD_OTEL_EXPORTER": "none"})
        pairs.append((on, off, off["create_rps"] / on["create_rps"]))
    on, off, _ = sorted(pairs, key=lambda pair: pair[0]["create_rps"])[len(pairs) // 2]
    figures: dict[str, object] = dict(on)
    figures["create_rps_telemetry_off"] = off["create_rps"]
    figures["telemetry_overhead"] = round(statistics.median(ratio for _, _, ratio in pairs), 3)
    figures["telemetry_overhead_pairs"] = [round(ratio, 3) for _, _, ratio in pairs]
    with postgres_database() as database, MetricTotals() as totals:
        figures["create_rps_postgres"] = create_figures({**totals.deployed_environment, **database})[
            "create_rps"
        ]
    return figures


def routing_figures() -> dict[str, object]:
    """In-process, while nothing else of the bench uses the CPU: the policy's time per decision, and
    the replay's costs against the oracle."""
    return {"route_decision_us": round(decision_seconds() * 1e6, 1), **replay.replay()}


def _in_data_dir(
    scenario: Callable[..., dict[str, object]], **arguments: object
) -> Callable[[], dict[str, object]]:
    def run_it() -> dict[str, object]:
        with tempfile.TemporaryDirectory(prefix="aiprod-bench-") as data_dir:
            return scenario(Path(data_dir), **arguments)

    return run_it


def scenarios() -> dict[str, Callable[[], dict[str, object]]]:
    """Each scenario's figures, by name, in the order `make bench` runs them."""
    return {
        "routing": routing_figures,
        "create": accept_path,
        "throughput": _in_data_dir(
            jobs.throughput, seconds=float(os.environ.get("BENCH_THROUGHPUT_SECONDS", "60"))
        ),
        "provider_requests": _in_data_dir(jobs.provider_requests),
        "failover": failover.failover,
        "inflight": _in_data_dir(jobs.in_flight, jobs=int(os.environ.get("BENCH_INFLIGHT_JOBS", "10000"))),
    }


def main() -> None:
    """`python -m bench [scenario ...]`: every scenario unless named (see scenarios())."""
    available = scenarios()
    wanted = sys.argv[1:] or list(available)
    unknown = set(wanted) - set(available)
    if unknown:
        sys.exit(f"unknown scenario {sorted(unknown)}; choose among {list(available)}")
    figures: dict[str, object] = {}
    for name in wanted:
        started = time.perf_counter()
        try:
            figures.update(available[name]())
        except Exception as error:
            # The other scenarios' figures still count; this one says why it has none.
            figures[f"{name}_error"] = f"{type(error).__name__}: {error}"[:500]
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        print(json.dumps(figures), file=sys.stderr, flush=True)  # what is known so far
    if "route_decision_us" in figures and "rpc_round_trip_us" in figures:
        figures["route_decision_vs_rpc"] = round(
            figures["route_decision_us"] / figures["rpc_round_trip_us"], 4
        )
    figures["goals"] = goals.goals(figures)
    print(goals.summary(figures["goals"]), file=sys.stderr, flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
