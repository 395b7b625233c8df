"""Chaos against the provider sandbox, bounded in count and time, loopback only: 70 jobs, 50 of them in
flight at once, on a mesh whose Runway renderer runs two replicas sharing one render-key store; the
gateway, the router, one Runway replica and the metrics service are SIGKILLed at moments a seeded
random generator picks while jobs render (each is started again), and one provider connection is
dropped mid-create (the task is created, its answer lost). Afterwards every job is terminal and none is
lost, no attempt key was created twice at any provider, and once every attempt is settled the ledger's
committed spend equals what the sandbox's providers billed, to the micro-dollar, but for the attempts
nobody can know the outcome of: those stay held in the ledger at their worst case. Runs on SQLite and
on PostgreSQL.

The seed is fixed, so a failing run can be repeated; AIPROD_CHAOS_SEED picks another.
"""

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import pytest
from helpers.mesh import TERMINAL, budget, eventually, gateway, log_lines
from helpers.postgres import assert_runs_on_its_store
from helpers.sandbox import Sandbox, account, provider_settings, sandbox_mesh

from aiprod.common.v1 import backend_pb2, event_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.failures import reason_name
from aiprod_kit.mesh import Mesh

T = TypeVar("T")
SEED = int(os.environ.get("AIPROD_CHAOS_SEED", "20240917"))
REPLICA_HOST = "127.0.0.2"
RUNWAY_REPLICAS = {"renderer-runway": "127.0.0.1", f"renderer-runway@{REPLICA_HOST}": REPLICA_HOST}
# Created at once, before the first kill: all of them in flight while the services die.
FIRST_WAVE = 50
# Created one by one through the chaos (so through a gateway restart, retried with their request ids).
SECOND_WAVE = 20
# Kills, the dropped create and the second wave happen within this many seconds of the first wave.
CHAOS_SECONDS = 12.0
# Each task renders this long at the sandbox: the first wave is still rendering through the chaos.
RENDER_SECONDS = 8
VICTIMS = ("gateway", "router", "runway-replica", "metrics")
# Generous but bounded: every job terminal within this after the chaos, every attempt settled (a
# settlement retried with backoff waits up to 10 s between tries) and every task billed within that.
TERMINAL_SECONDS = 150.0
SETTLE_SECONDS = 60.0
HOLD = event_pb2.CHARGE_OUTCOME_HOLD

ENVIRONMENT = {
    # A restarted gateway takes the dead one's jobs over once their claims run out.
    "AIPROD_GATEWAY_JOB_LEASE_SECONDS": "3",
    # No cap: the money compared is all of it, no job waits for budget.
    "AIPROD_METRICS_DAILY_CAP_USD": "0",
    # Small videos: the test measures the mesh's faults, not the encoder (70 of them on two cores).
    "AIPROD_SANDBOX_VIDEO_SHORT_SIDE": "180",
    # Dozens of tasks polled at once on two cores: often enough, not a storm.
    **provider_settings(POLL_SECONDS="0.5", REQUESTS_PER_MINUTE="100000", MAX_CONCURRENT_TASKS="100"),
}


@dataclass
class Chaos:
    """What was done, when (seconds from the first create), for the report of a failing run."""

    seed: int
    started: float = field(default_factory=time.monotonic)
    log: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, what: str) -> None:
        with self.lock:
            self.log.append(f"{time.monotonic() - self.started:6.2f}s {what}")

    def __str__(self) -> str:
        return f"seed {self.seed}:\n  " + "\n  ".join(self.log)


@pytest.fixture
def mesh(tmp_path: Path, database_environment: dict[str, str]) -> Iterator[Mesh]:
    """The whole mesh against the sandbox, with a second Runway replica on the same data directory (and
    database) as the first; the router and the gateway restarted to know both."""
    environment = {**ENVIRONMENT, **database_environment}
    with sandbox_mesh(tmp_path, environment) as running:
        running.start_replica("renderer-runway", REPLICA_HOST)
        running.stop_service("gateway")
        running.stop_service("router")
        running.start_service("router")
        running.start_service("gateway")
        for service in ("gateway", "metrics", *RUNWAY_REPLICAS):
            assert_runs_on_its_store(running, service, environment)
        yield running


def committed(mesh: Mesh) -> int:
    """The day's committed spend: spent less the uncertain money of expired, unreconciled reservations,
    which GetBudget counts in spent at their worst case though no provider said it billed them."""
    day = budget(mesh)
    return day.spent.amount_micros - day.uncertain.amount_micros


def retried(call: Callable[[], T], deadline: float) -> T:
    """The call, tried again while the service it reaches is down or restarting, until the deadline."""
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            transient = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if error.code() not in transient or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def create(mesh: Mesh, request_id: str) -> str:
    """A two-second Runway job; asked again with its request id until the gateway answers."""
    spec = render_pb2.RenderSpec(
        prompt=f"Chaos {request_id}",
        duration_seconds=2,
        constraints=render_pb2.RenderConstraints(preferred_backend=backend_pb2.BACKEND_RUNWAY),
    )
    request = gateway_pb2.CreateRenderJobRequest(request_id=request_id, spec=spec)
    job = retried(lambda: gateway(mesh).CreateRenderJob(request, timeout=10).job, time.monotonic() + 60)
    return job.job_id


def get(mesh: Mesh, job_id: str) -> gateway_pb2.RenderJob:
    request = gateway_pb2.GetRenderJobRequest(job_id=job_id)
    return retried(lambda: gateway(mesh).GetRenderJob(request, timeout=10).job, time.monotonic() + 30)


def events(mesh: Mesh, job_id: str, deadline: float) -> list[gateway_pb2.JobEvent]:
    """The job's event log from its start up to its terminal event, or as far as it got by the deadline;
    followed again from the start when the gateway restarts under the stream."""
    while True:
        seen: list[gateway_pb2.JobEvent] = []
        request = gateway_pb2.WatchRenderJobRequest(job_id=job_id)
        try:
            stream = gateway(mesh).WatchRenderJob(request, timeout=max(deadline - time.monotonic(), 0.5))
            for message in stream:
                if message.HasField("event"):
                    seen.append(message.event)
                    if message.event.state in TERMINAL:
                        stream.cancel()
                        break
            return seen
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return seen
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def list_job_ids(mesh: Mesh) -> set[str]:
    found: set[str] = set()
    token = ""
    while True:
        request = gateway_pb2.ListRenderJobsRequest(page_size=100, page_token=token)
        answer = retried(
            lambda request=request: gateway(mesh).ListRenderJobs(request, timeout=10), time.monotonic() + 30
        )
        found |= {job.job_id for job in answer.jobs}
        token = answer.next_page_token
        if not token:
            return found


def report(mesh: Mesh, job_ids: list[str], chaos: Chaos) -> str:
    """Everything known about some jobs: their record, events and log lines."""
    parts = [str(chaos)]
    for job_id in job_ids[:5]:
        job = get(mesh, job_id)
        log = events(mesh, job_id, deadline=time.monotonic() + 3)
        parts.append(f"--- job {job_id}:\n{job}")
        parts.append("events:\n" + "\n".join(f"  {json_event(event)}" for event in log))
        parts.append("logs:\n" + "\n".join(log_lines(mesh, job_id)))
    return "\n".join(parts)


def json_event(event: gateway_pb2.JobEvent) -> str:
    return " ".join(str(event).split())[:600]


def settled(job: gateway_pb2.RenderJob) -> bool:
    """Every attempt ended with a charge, and the ledger has its commit or release (a held one stays
    reserved in the ledger until reconciled)."""
    return all(a.HasField("charge") and (a.settled or a.charge.outcome == HOLD) for a in job.attempts)


def run_chaos(mesh: Mesh, sandbox: Sandbox, rng: random.Random, chaos: Chaos) -> None:
    """Kills each victim once at its seeded moment and starts it again; queues the dropped create."""
    victim_replica = rng.choice(sorted(RUNWAY_REPLICAS))
    moments = sorted((rng.uniform(1.0, CHAOS_SECONDS), victim) for victim in VICTIMS)
    drop_at = rng.uniform(1.0, CHAOS_SECONDS - 3)
    plan = [(drop_at, "drop"), *moments]
    chaos.note(f"plan: {[(round(at, 2), what) for at, what in sorted(plan)]}, replica {victim_replica}")
    for at, what in sorted(plan):
        time.sleep(max(0.0, at - (time.monotonic() - chaos.started)))
        if what == "drop":
            # The next create at any provider is acted on, and then its connection is closed unanswered.
            sandbox.fault("*", "create", "drop", times=1, phase="after")
            chaos.note("drop fault queued")
            continue
        name = victim_replica if what == "runway-replica" else what
        host = RUNWAY_REPLICAS.get(name, "127.0.0.1")
        base = name.partition("@")[0]
        mesh.kill(name)
        chaos.note(f"killed {name}")
        time.sleep(rng.uniform(0.0, 1.5))
        mesh.start_service(base, host=host)
        chaos.note(f"restarted {name}")


def test_jobs_outlive_sigkills_and_a_dropped_create_each_task_created_once_and_the_ledger_as_billed(mesh):
    chaos = Chaos(SEED)
    rng = random.Random(SEED)
    sandbox = Sandbox(mesh.address("sandbox"))
    sandbox.reset(render_seconds=RENDER_SECONDS)
    before = committed(mesh)
    before_reserved = budget(mesh).reserved.amount_micros

    # request id -> job id, every answer to one request id the same job.
    jobs: dict[str, str] = {}
    answers: dict[str, set[str]] = {}

    def make(request_id: str) -> None:
        job_id = create(mesh, request_id)
        jobs[request_id] = job_id
        answers.setdefault(request_id, set()).add(job_id)

    chaos.started = time.monotonic()
    for n in range(FIRST_WAVE):
        make(f"chaos-{SEED}-a{n}")
    chaos.note(f"first wave of {FIRST_WAVE} created")
    # All of them in flight as the chaos begins (each renders RENDER_SECONDS at the sandbox).
    first = set(jobs.values())
    # Read in one call: fifty one after the other, under this load, took long enough for the first to end.
    listed = gateway(mesh).ListRenderJobs(gateway_pb2.ListRenderJobsRequest(page_size=1000), timeout=10).jobs
    in_flight = [job.job_id for job in listed if job.job_id in first and job.state not in TERMINAL]
    assert len(in_flight) == FIRST_WAVE, str(chaos)

    failures: list[BaseException] = []

    def second_wave() -> None:
        try:
            for n in range(SECOND_WAVE):
                time.sleep(CHAOS_SECONDS / SECOND_WAVE)
                make(f"chaos-{SEED}-b{n}")
            chaos.note(f"second wave of {SECOND_WAVE} created")
        except BaseException as error:  # reported by the test's thread
            failures.append(error)

    creator = threading.Thread(target=second_wave, name="second-wave")
    creator.start()
    try:
        run_chaos(mesh, sandbox, rng, chaos)
    finally:
        creator.join(120)
    assert not failures, (failures, str(chaos))
    assert len(jobs) == FIRST_WAVE + SECOND_WAVE
    assert all(len(ids) == 1 for ids in answers.values()), (answers, str(chaos))
    job_ids = list(jobs.values())
    assert len(set(job_ids)) == len(job_ids)

    # Every job ends: followed through its event log to its terminal event.
    deadline = time.monotonic() + TERMINAL_SECONDS
    logs = {job_id: events(mesh, job_id, deadline) for job_id in job_ids}
    hanging = [job_id for job_id in job_ids if get(mesh, job_id).state not in TERMINAL]
    chaos.note(f"all jobs followed; {len(hanging)} not terminal")
    assert not hanging, report(mesh, hanging, chaos)
    for job_id, log in logs.items():
        assert log and log[-1].state in TERMINAL, report(mesh, [job_id], chaos)
        assert [event.sequence for event in log] == list(range(1, len(log) + 1)), report(
            mesh, [job_id], chaos
        )

    # None lost: the gateway lists every job it answered for.
    listed = list_job_ids(mesh)
    lost = [job_id for job_id in job_ids if job_id not in listed]
    assert not lost, report(mesh, lost, chaos)

    # Every attempt settled (or held), and every task the sandbox created billed at its final state.
    def unsettled() -> list[str]:
        return [job_id for job_id in job_ids if not settled(get(mesh, job_id))]

    assert eventually(lambda: not unsettled(), timeout=SETTLE_SECONDS, interval=0.5), report(
        mesh, unsettled(), chaos
    )

    def created_tasks() -> set[str]:
        counters = sandbox.counters()["tasks"]
        return {task_id for provider in counters.values() for task_id in provider}

    assert eventually(lambda: created_tasks() <= set(sandbox.bills().tasks), timeout=SETTLE_SECONDS), (
        created_tasks() - set(sandbox.bills().tasks)
    )
    chaos.note("every attempt settled, every task billed")

    done = {job_id: get(mesh, job_id) for job_id in job_ids}
    attempts = {a.reservation_key: (job_id, a) for job_id, job in done.items() for a in job.attempts}
    bills = sandbox.bills()
    counters = sandbox.counters()
    faults = httpx.get(f"{sandbox.root}/_sandbox/faults", timeout=10).json()
    states = Counter(job.state for job in done.values())
    summary = {
        "states": dict(states),
        "attempts": len(attempts),
        "held": [key for key, (_, a) in attempts.items() if a.charge.outcome == HOLD],
        "failures": dict(Counter(reason_name(job.error.reason) for job in done.values() if job.error.reason)),
        "creates": {provider: sum(keys.values()) for provider, keys in counters["creates"].items()},
        "billed_total": bills.total_micros,
        "faults": faults,
    }
    chaos.note(f"summary: {json.dumps(summary, default=str)}")
    print(chaos)

    # The dropped create happened.
    assert [rule["fired"] for rule in faults] == [1], (faults, str(chaos))

    # No attempt key created twice at any provider.
    doubles = {
        provider: {key: count for key, count in keys.items() if count > 1}
        for provider, keys in counters["creates"].items()
    }
    doubles = {provider: keys for provider, keys in doubles.items() if keys}
    assert not doubles, (
        doubles,
        report(mesh, sorted({key.rpartition(":")[0] for keys in doubles.values() for key in keys}), chaos),
    )
    # Every task billed belongs to an attempt some job lists.
    strangers = {key for key in bills.by_key if key not in attempts}
    assert not strangers, (strangers, bills, str(chaos))

    # Each settled attempt's charge is what its provider billed for its key; a held one (its outcome
    # unknown: the dropped create, or a create cut by a kill) keeps at least its bill reserved.
    accounted = account(attempts, bills)
    wrong, held_billed, held_reserved = accounted.wrong, accounted.held_billed, accounted.held_reserved
    assert not wrong, (wrong, report(mesh, sorted({job_id for job_id, *_ in wrong}), chaos))
    costs = sum(job.cost.amount_micros for job in done.values())
    assert costs == bills.total_micros - held_billed, (costs, bills.total_micros, held_billed, str(chaos))

    # The ledger: committed spend is the bill of every attempt whose outcome is known, to the
    # micro-dollar; the held ones are still held at their worst case (reserved, or uncertain once
    # their reservations expired), and nothing else is.
    after = budget(mesh)
    assert committed(mesh) - before == bills.total_micros - held_billed, (after, summary, str(chaos))
    held_in_ledger = after.reserved.amount_micros - before_reserved + after.uncertain.amount_micros
    assert held_in_ledger == held_reserved, (after, summary, str(chaos))
