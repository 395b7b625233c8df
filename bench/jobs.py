"""Jobs through the whole mesh against the provider sandbox: what a finished job costs the mesh, how
many it finishes a second, how many it holds in flight and in how much memory, how many provider
requests each one makes.

Every scenario runs the real services as processes on free loopback ports, exporting their metrics to
the bench's OTLP receiver (bench/otlp.py), and calls the gateway as a client would (an API key on every
call). The development tenant's tier limits and the daily cap are lifted: the figures are the mesh's,
not the limiter's.
"""

import asyncio
import json
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod_kit.apikeys import aio_interceptors
from aiprod_kit.errors import error_reason, retry_delay
from aiprod_kit.mesh import PROVIDER_BACKENDS, Mesh
from aiprod_kit.rendering import qc
from bench.otlp import MetricTotals

PROVIDERS = PROVIDER_BACKENDS
PREFERRED = {
    "runway": backend_pb2.BACKEND_RUNWAY,
    "veo": backend_pb2.BACKEND_VEO,
    "replicate": backend_pb2.BACKEND_REPLICATE,
}
UNLIMITED = {
    "AIPROD_METRICS_DAILY_CAP_USD": "0",
    # quick_social (no review step) priced so that Veo qualifies too: a job can go to any provider.
    "AIPROD_GATEWAY_PRESET_PRICES": json.dumps({"quick_social": 30.0}),
    "AIPROD_GATEWAY_TIERS": json.dumps({"GOLD": {"concurrent_jobs": 10**9, "requests_per_minute": 10**9}}),
}
# How long a create is asked again while the gateway says when to.
CREATE_RETRY_SECONDS = 600.0
TERMINAL = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED)
RPC = "rpc.server.call.duration"
SERVICES = ("gateway", "router", "metrics", *(f"renderer-{provider}" for provider in PROVIDERS))


def provider_settings(**values: str) -> dict[str, str]:
    """AIPROD_<PROVIDER>_<NAME> for every provider renderer."""
    return {
        f"AIPROD_{provider.upper()}_{name}": value for provider in PROVIDERS for name, value in values.items()
    }


# Replicate's default model renders 6 s clips.
_SECONDS = {None: 4, "runway": 4, "veo": 4, "replicate": 6}


def spec(prompt: str, provider: str | None = None) -> render_pb2.RenderSpec:
    preset, seconds = "quick_social", _SECONDS[provider]
    constraints = render_pb2.RenderConstraints(preferred_backend=PREFERRED[provider]) if provider else None
    return render_pb2.RenderSpec(
        prompt=prompt,
        preset=preset,
        duration_seconds=seconds,
        aspect_ratio=render_pb2.ASPECT_RATIO_16_9,
        constraints=constraints,
    )


@contextmanager
def running(data_dir: Path, totals: MetricTotals, environment: dict[str, str]) -> Iterator[Mesh]:
    mesh = Mesh(
        data_dir,
        free_ports=True,
        sandbox=True,
        environment={**UNLIMITED, **totals.environment, **environment},
    )
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()


def configure_sandbox(mesh: Mesh, **config: object) -> None:
    httpx.post(
        f"http://{mesh.address('sandbox')}/_sandbox/config", json=config, timeout=10
    ).raise_for_status()


class Client:
    """The gateway, as an internal service calls it."""

    def __init__(self, mesh: Mesh) -> None:
        self._channel = grpc.aio.insecure_channel(
            mesh.address("gateway"), interceptors=aio_interceptors(mesh.api_key)
        )
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        # Creates asked again after a RetryInfo, by the refusal's ErrorInfo reason.
        self.create_retries: Counter[str] = Counter()

    async def close(self) -> None:
        await self._channel.close()

    async def create(self, spec: render_pb2.RenderSpec) -> str:
        """Creates the job, asking again under the same request id (idempotent) as long as the gateway
        says when to (a RetryInfo: backends down for now, a limit), as a well-behaved client does."""
        request = gateway_pb2.CreateRenderJobRequest(request_id=uuid.uuid4().hex, spec=spec)
        give_up = time.monotonic() + CREATE_RETRY_SECONDS
        while True:
            try:
                return (await self.gateway.CreateRenderJob(request, timeout=120)).job.job_id
            except grpc.aio.AioRpcError as error:
                delay = retry_delay(error)
                if delay is None or time.monotonic() + delay > give_up:
                    raise
                self.create_retries[error_reason(error) or error.code().name] += 1
                await asyncio.sleep(delay)

    async def finish(self, job_id: str) -> int:
        """Follows the job's events to its end; returns its final state."""
        request = gateway_pb2.WatchRenderJobRequest(job_id=job_id)
        async for message in self.gateway.WatchRenderJob(request):
            if message.HasField("event") and message.event.state in TERMINAL:
                return message.event.state
        job = await self.gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job_id), timeout=30)
        return job.job.state

    async def counts(self) -> dict[int, int]:
        usage = await self.gateway.GetUsage(gateway_pb2.GetUsageRequest(), timeout=60)
        return {count.state: count.count for count in usage.jobs}


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples the summed resident memory of the mesh's services (the sandbox, which stands for the
    providers, left out) every half second; `peak_mb` is the highest sum seen."""

    def __init__(self, mesh: Mesh) -> None:
        self._pids = [s.process.pid for name, s in mesh.services.items() if name != "sandbox"]
        self.start_mb = self._sum_mb()
        self.peak_mb = self.start_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sum_mb(self) -> float:
        return sum(_rss_kib(pid) for pid in self._pids) / 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak_mb = max(self.peak_mb, self._sum_mb())

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def job_costs(totals: MetricTotals, before: dict[str, float], jobs: int) -> dict[str, object]:
    """What the jobs between two readings cost, per job: RPCs answered (health left out; the client's
    own create and watch included), store transactions, provider requests."""
    now = reading(totals)
    per_job = {name: (now[name] - before.get(name, 0.0)) / max(jobs, 1) for name in now}
    return {
        "rpcs_per_job": round(per_job["rpcs"], 2),
        "store_transactions_per_job": round(per_job["transactions"], 2),
        "provider_requests_per_job": round(per_job["provider_requests"], 2),
        "rpcs_per_job_by_method": {
            name.removeprefix("rpc:"): round(value, 2)
            for name, value in sorted(per_job.items(), key=lambda item: -item[1])
            if name.startswith("rpc:") and value >= 0.05
        },
        "store_transactions_per_job_by_service": {
            name.removeprefix("store:"): round(value, 2)
            for name, value in per_job.items()
            if name.startswith("store:")
        },
    }


def provider_requests_made(totals: MetricTotals, **backend: str) -> float:
    """Requests for renders (create, poll, cancel, download), the renderers' health probes left out."""
    operations = ("create", "get", "cancel", "download")
    return sum(
        totals.total("aiprod.renderer.provider_requests", operation=op, **backend) for op in operations
    )


def qc_cpu_seconds(uri: str, times: int = 10) -> float:
    """The CPU time (every thread's: the decoder runs its own) of the renderers' technical QC of one
    output, here, with nothing else running in this process."""
    path = Path(urllib.parse.urlsplit(uri).path)
    qc.probe(path)
    started = time.process_time()
    for _ in range(times):
        qc.probe(path)
    return (time.process_time() - started) / times


def reading(totals: MetricTotals) -> dict[str, float]:
    totals.settled()
    figures = {
        "rpcs": totals.total(RPC),
        "transactions": totals.total("aiprod.store.transactions"),
        "provider_requests": provider_requests_made(totals),
    }
    for (service, method), count in totals.by_method(RPC).items():
        figures[f"rpc:{service.rpartition('.')[2]}.{method}"] = count
    for service in SERVICES:
        figures[f"store:{service}"] = totals.total(
            "aiprod.store.transactions", **{"service.name": f"aiprod-{service}"}
        )
    return figures


async def _throughput(
    mesh: Mesh, totals: MetricTotals, seconds: float, outstanding: int
) -> dict[str, object]:
    client = Client(mesh)
    try:
        # Warm-up: every path taken once, caches filled.
        async def warm_up() -> None:
            await client.finish(await client.create(spec("warm-up")))

        await asyncio.gather(*(warm_up() for _ in range(outstanding)))
        before = reading(totals)
        finished: list[float] = []
        states: list[int] = []
        outputs: list[str] = []
        created = 0
        stop_at = time.monotonic() + seconds

        async def one_after_another() -> None:
            nonlocal created
            while time.monotonic() < stop_at:
                created += 1
                job_id = await client.create(spec("A paper boat on a pond", PROVIDERS[created % 3]))
                states.append(await client.finish(job_id))
                finished.append(time.monotonic())
                outputs.append(job_id)

        started = time.monotonic()
        await asyncio.gather(*(one_after_another() for _ in range(outstanding)))
        in_window = sum(1 for at in finished if at <= started + seconds)
        costs = job_costs(totals, before, created)
        job = await client.gateway.GetRenderJob(
            gateway_pb2.GetRenderJobRequest(job_id=outputs[-1]), timeout=30
        )
    finally:
        await client.close()
    return {
        "completed_jobs_per_s": round(in_window / seconds, 2),
        "qc_cpu_seconds_per_job": round(qc_cpu_seconds(job.job.result.video.uri), 4),
        "completed_all_succeeded": all(state == job_pb2.JOB_STATE_SUCCEEDED for state in states),
        **{key: value for key, value in costs.items() if key != "provider_requests_per_job"},
    }


def throughput(data_dir: Path, seconds: float = 60.0, outstanding: int = 64) -> dict[str, object]:
    """Jobs finished a second, sustained over `seconds` with `outstanding` clients each creating a job
    and following it to its end, then the next: renders instant at the sandbox (polled every 0.2 s),
    every output copied, decoded and checked in full. The costs per job are over every job created in
    the window, each followed to its end."""
    environment = {
        **provider_settings(POLL_SECONDS="0.2", REQUESTS_PER_MINUTE="1000000", MAX_CONCURRENT_TASKS="1000")
    }
    with MetricTotals() as totals, running(data_dir, totals, environment) as mesh:
        configure_sandbox(mesh, render_seconds=0)
        return asyncio.run(_throughput(mesh, totals, seconds, outstanding))


async def _in_flight(mesh: Mesh, jobs: int, render_seconds: float) -> dict[str, object]:
    client = Client(mesh)
    try:
        semaphore = asyncio.Semaphore(64)

        async def create(index: int) -> str:
            async with semaphore:
                return await client.create(spec(f"In flight {index % 10}", PROVIDERS[index % 3]))

        with PeakMemory(mesh) as memory:
            started = time.monotonic()
            await asyncio.gather(*(create(index) for index in range(jobs)))
            created_seconds = time.monotonic() - started
            most_running = 0
            while True:
                counts = await client.counts()
                most_running = max(most_running, counts.get(job_pb2.JOB_STATE_RUNNING, 0))
                if sum(counts.get(state, 0) for state in TERMINAL) >= jobs:
                    break
                await asyncio.sleep(2)
            elapsed = time.monotonic() - started
    finally:
        await client.close()
    return {
        "inflight_jobs": jobs,
        "inflight_most_running": most_running,
        "inflight_all_succeeded": counts.get(job_pb2.JOB_STATE_SUCCEEDED, 0) == jobs,
        "inflight_create_seconds": round(created_seconds, 1),
        "inflight_create_retries": client.create_retries.total(),
        "inflight_create_retries_by_reason": dict(client.create_retries),
        "inflight_failed": counts.get(job_pb2.JOB_STATE_FAILED, 0),
        "inflight_seconds": round(elapsed, 1),
        "inflight_render_seconds": render_seconds,
        "peak_rss_mb": round(memory.peak_mb, 1),
        "idle_rss_mb": round(memory.start_mb, 1),
        "rss_kb_per_job_in_flight": round((memory.peak_mb - memory.start_mb) * 1024 / jobs, 1),
    }


def in_flight(data_dir: Path, jobs: int = 10_000, render_seconds: float = 120.0) -> dict[str, object]:
    """`jobs` jobs created as fast as 64 clients can, each a `render_seconds` render at the sandbox,
    polled at the production intervals (the providers' request limits lifted: the sandbox is no
    provider's account); the mesh's summed peak memory meanwhile."""
    environment = provider_settings(REQUESTS_PER_MINUTE="10000000", MAX_CONCURRENT_TASKS=str(jobs))
    with MetricTotals() as totals, running(data_dir, totals, environment) as mesh:
        configure_sandbox(mesh, render_seconds=render_seconds)
        return asyncio.run(_in_flight(mesh, jobs, render_seconds))


async def _provider_requests(mesh: Mesh, totals: MetricTotals, jobs: int) -> dict[str, object]:
    client = Client(mesh)
    try:
        before = reading(totals)
        ids = [await client.create(spec(f"Requests {index}", PROVIDERS[index % 3])) for index in range(jobs)]
        states = await asyncio.gather(*(client.finish(job_id) for job_id in ids))
        per_provider = {
            provider: round(provider_requests_made(totals, backend=provider) / (jobs / 3), 2)
            for provider in PROVIDERS
        }
        costs = job_costs(totals, before, jobs)
    finally:
        await client.close()
    return {
        "provider_requests_per_job": costs["provider_requests_per_job"],
        "provider_requests_per_job_by_provider": per_provider,
        "provider_requests_all_succeeded": all(state == job_pb2.JOB_STATE_SUCCEEDED for state in states),
    }


def provider_requests(data_dir: Path, jobs: int = 30, render_seconds: float = 60.0) -> dict[str, object]:
    """Provider HTTP requests per finished job: `render_seconds` renders spread over the three
    providers, polled at the production intervals (AIPROD_<PROVIDER>_POLL_SECONDS unset)."""
    environment = provider_settings(REQUESTS_PER_MINUTE="1000000")
    with MetricTotals() as totals, running(data_dir, totals, environment) as mesh:
        configure_sandbox(mesh, render_seconds=render_seconds)
        return asyncio.run(_provider_requests(mesh, totals, jobs))
