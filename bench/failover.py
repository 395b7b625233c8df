"""Failover: how fast the router stops choosing a renderer that died or stopped serving, and whether any
job is lost meanwhile.

Each trial takes the Runway renderer out while jobs run on every provider (a new one every
CREATE_EVERY_SECONDS, a load the box sustains), and measures from that moment to the router reporting
it NOT_SERVING (from then on no render is routed to it): the even trials SIGKILL it (the router's
health Watch stream breaks), the odd ones SIGTERM it (its health turns NOT_SERVING at once, then it
drains its renders for up to AIPROD_SHUTDOWN_GRACE_SECONDS). It is started again, and the next trial
begins once the router sees it SERVING. Every job created during the trials
must end; one that does not, or fails, is counted.
"""

import asyncio
import json
import signal
import tempfile
import time
from datetime import datetime
from pathlib import Path

import grpc

from aiprod.common.v1 import backend_pb2, job_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from bench import jobs
from bench.otlp import MetricTotals

TRIALS = 20
RENDERER = "renderer-runway"
REACTION_LIMIT_SECONDS = 10.0
# A job created this often during the trials: about half what this box completes (a 1 s render and
# the full decode of its output for QC, 0.2 CPU-seconds, on two cores: about 8 a second). At 20 a
# second (0.05, until session 12) the box was overloaded and a reaction measured the QC backlog.
CREATE_EVERY_SECONDS = 0.25
JOB_END_SECONDS = 300.0
LOG_WAIT_SECONDS = 2.0
LOG_READ_EVERY_SECONDS = 0.05


async def _health(router: router_pb2_grpc.RouterServiceStub) -> int:
    backends = (await router.ListBackends(router_pb2.ListBackendsRequest(), timeout=5)).backends
    return next(status.health for status in backends if status.backend == backend_pb2.BACKEND_RUNWAY)


async def _until(router: router_pb2_grpc.RouterServiceStub, health: int, limit: float) -> float:
    """Seconds until the router reports the backend in that health (inf past the limit)."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        if await _health(router) == health:
            return time.perf_counter() - started
    return float("inf")


async def _exited(process, signalled: float) -> float:
    """Seconds from the signal to the process's exit, as its parent sees it (a SIGKILLed process's
    sockets close only once the kernel has torn it down)."""
    await asyncio.to_thread(process.wait)
    return time.perf_counter() - signalled


def _logged_after(log_path: Path, since: float, event: str, **fields: object) -> float | None:
    """When (epoch seconds) a service first logged the event with those fields at or after `since`."""
    for line in log_path.read_text(errors="replace").splitlines():
        if event not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") != event or any(record.get(key) != value for key, value in fields.items()):
            continue
        logged = datetime.fromisoformat(record["timestamp"]).timestamp()
        if logged >= since:
            return logged
    return None


async def _logged(log_path: Path, since: float, event: str, **fields: object) -> float | None:
    """_logged_after, waiting LOG_WAIT_SECONDS for the line: the mesh copies each service's output to its
    log file from a pipe, a moment after the service wrote it."""
    for _ in range(round(LOG_WAIT_SECONDS / LOG_READ_EVERY_SECONDS)):
        if (logged := _logged_after(log_path, since, event, **fields)) is not None:
            return logged
        await asyncio.sleep(LOG_READ_EVERY_SECONDS)
    return None


def _ms_after(since: float, logged: float | None) -> float | None:
    return None if logged is None else round((logged - since) * 1000, 1)


async def _trials(mesh, trials: int) -> dict[str, object]:
    client = jobs.Client(mesh)
    async with grpc.aio.insecure_channel(mesh.address("router")) as channel:
        router = router_pb2_grpc.RouterServiceStub(channel)
        created: list[str] = []
        stop = asyncio.Event()

        async def keep_creating() -> None:
            index = 0
            while not stop.is_set():
                created.append(await client.create(jobs.spec("Failover", jobs.PROVIDERS[index % 3])))
                index += 1
                await asyncio.sleep(CREATE_EVERY_SECONDS)

        creating = asyncio.create_task(keep_creating())
        reactions: list[float] = []
        exits: list[float] = []
        drained: list[float | None] = []
        noticed: list[float | None] = []
        try:
            for trial in range(trials):
                renderer = mesh.services[RENDERER]
                process = renderer.process
                signalled, signalled_at = time.perf_counter(), time.time()
                process.send_signal(signal.SIGKILL if trial % 2 == 0 else signal.SIGTERM)
                exited = asyncio.create_task(_exited(process, signalled))
                reactions.append(
                    await _until(router, router_pb2.BACKEND_HEALTH_NOT_SERVING, REACTION_LIMIT_SECONDS)
                )
                exits.append(await exited)
                # Where a slow reaction's time went, from the services' own logs.
                drained.append(
                    _ms_after(signalled_at, await _logged(renderer.log_path, signalled_at, "draining"))
                )
                noticed.append(
                    _ms_after(
                        signalled_at,
                        await _logged(
                            mesh.services["router"].log_path,
                            signalled_at,
                            "renderer health",
                            backend="runway",
                            serving=False,
                        ),
                    )
                )
                await asyncio.to_thread(mesh.start_service, RENDERER)
                await _until(router, router_pb2.BACKEND_HEALTH_SERVING, 60.0)
        finally:
            stop.set()
            await creating
        try:
            states = await asyncio.wait_for(
                asyncio.gather(*(client.finish(job_id) for job_id in created)), JOB_END_SECONDS
            )
            unfinished = 0
        except TimeoutError:
            counts = await client.counts()
            states = []
            unfinished = len(created) - sum(counts.get(state, 0) for state in jobs.TERMINAL)
        await client.close()
    kill, term = reactions[0::2], reactions[1::2]
    reactions.sort()
    return {
        "failover_p99_ms": round(reactions[min(len(reactions) - 1, int(len(reactions) * 0.99))] * 1000, 1),
        "failover_median_ms": round(reactions[len(reactions) // 2] * 1000, 1),
        # Each trial's, by kind: what the p99 of 20 (the slowest) stands out from.
        "failover_sigkill_ms": [round(seconds * 1000, 1) for seconds in kill],
        "failover_sigterm_ms": [round(seconds * 1000, 1) for seconds in term],
        # From the SIGKILL to the process's exit: the part of a reaction the router cannot shorten.
        "failover_sigkill_exit_ms": [round(seconds * 1000, 1) for seconds in exits[0::2]],
        # From the SIGTERM to the renderer's "draining" line (its health turns NOT_SERVING next).
        "failover_sigterm_draining_ms": drained[1::2],
        # From the signal to the router's "renderer health" line (serving false): the rest of a
        # reaction is the bench's ListBackends call reaching the router and coming back.
        "failover_router_noticed_ms": noticed,
        "failover_trials": trials,
        "failover_create_every_s": CREATE_EVERY_SECONDS,
        "failover_jobs": len(created),
        "jobs_lost": unfinished,
        "failover_jobs_failed": sum(1 for state in states if state != job_pb2.JOB_STATE_SUCCEEDED),
    }


def failover(trials: int = TRIALS) -> dict[str, object]:
    environment = {
        **jobs.provider_settings(
            POLL_SECONDS="0.5", REQUESTS_PER_MINUTE="1000000", MAX_CONCURRENT_TASKS="1000"
        ),
        # A SIGTERMed renderer drains for 2 s: it stays up, NOT_SERVING, while the router's reaction is
        # measured, and the trials do not wait long for it.
        "AIPROD_SHUTDOWN_GRACE_SECONDS": "2",
    }
    with (
        tempfile.TemporaryDirectory(prefix="aiprod-bench-") as data_dir,
        MetricTotals() as totals,
        jobs.running(Path(data_dir), totals, environment) as mesh,
    ):
        jobs.configure_sandbox(mesh, render_seconds=1)
        return asyncio.run(_trials(mesh, trials))
