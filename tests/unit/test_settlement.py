"""The outbox's reconciliation of held attempts against the renderers' retention of their keys."""

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.router.v1 import router_pb2
from aiprod_gateway.settlement import Settlement, record_charge
from aiprod_gateway.store import SqlJobStore
from aiprod_kit.database import SqliteDatabase

DAY = 86_400.0
NOW = 1_800_000_000.0
RELEASE, HOLD = event_pb2.CHARGE_OUTCOME_RELEASE, event_pb2.CHARGE_OUTCOME_HOLD


class Router:
    """Answers every reconciliation: ended, released, as a renderer with no key says."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def ReconcileAttempt(self, request: router_pb2.ReconcileAttemptRequest, timeout: float):
        self.asked.append(request.idempotency_key)
        charge = event_pb2.AttemptCharge(backend=request.backend, outcome=RELEASE)
        return router_pb2.ReconcileAttemptResponse(ended=True, charge=charge)


async def held_job(store: SqlJobStore, job_id: str, created: float) -> None:
    job = gateway_pb2.RenderJob(
        job_id=job_id, request_id=job_id, tenant_id="acme", state=job_pb2.JOB_STATE_QUEUED
    )
    job.create_time.FromSeconds(int(created))
    await store.create_job(job, "f")

    def held(stored: gateway_pb2.RenderJob) -> None:
        stored.state = job_pb2.JOB_STATE_FAILED
        key = f"{job_id}:0:1"
        stored.attempts.add(
            attempt=1,
            backend=backend_pb2.BACKEND_RUNWAY,
            reservation_key=key,
            charge=event_pb2.AttemptCharge(reservation_key=key, outcome=HOLD),
        )

    await store.append_event(job_id, "its end unseen", held)


async def test_a_held_attempt_older_than_the_keys_retention_is_not_released_for_an_unknown_key(tmp_path):
    store = await SqlJobStore.open(SqliteDatabase(tmp_path / "jobs.sqlite3", "jobs"))
    try:
        await held_job(store, "job_young", NOW - 29 * DAY)
        await held_job(store, "job_old", NOW - 31 * DAY)
        router = Router()
        settlement = Settlement(store, None, router, 30 * DAY, clock=lambda: NOW)  # type: ignore[arg-type]
        await settlement.settle_pending()
        assert sorted(router.asked) == ["job_old:0:1", "job_young:0:1"]
        outcomes = {}
        for job_id in ("job_young", "job_old"):
            stored = await store.get_job(job_id)
            assert stored is not None
            outcomes[job_id] = stored.attempts[0].charge.outcome
        # The young job's renderers still have its key: none means no create. The old one's may have
        # forgotten it: its attempt stays held, its reservation counted at its worst.
        assert outcomes == {"job_young": RELEASE, "job_old": HOLD}
        assert [job_id for _, job_id in await store.held_jobs(10, 0)] == ["job_old"]
        # Without a retention, nothing is forgotten: a release is a release.
        await Settlement(store, None, router, 0.0, clock=lambda: NOW)._reconcile(  # type: ignore[arg-type]
            (old := await store.get_job("job_old")), old.attempts[0]
        )
        assert (await store.get_job("job_old")).attempts[0].charge.outcome == RELEASE
    finally:
        await store.close()


class Ledger:
    """Takes every commit and release; records the reservation keys it was told."""

    def __init__(self) -> None:
        self.told: list[str] = []

    async def CommitSpend(self, request, timeout: float):
        self.told.append(request.reservation_key)

    async def ReleaseBudget(self, request, timeout: float):
        self.told.append(request.reservation_key)


async def test_a_charge_handed_over_is_settled_from_its_job_and_others_from_a_read(tmp_path, monkeypatch):
    """The charge recorded here is told from the job its event wrote, no read of the unsettled jobs; one
    recorded elsewhere (another replica) waits for a read, which a charge without its job asks for."""
    store = await SqlJobStore.open(SqliteDatabase(tmp_path / "jobs.sqlite3", "jobs"))
    try:
        for job_id in ("job_here", "job_elsewhere", "job_later"):
            await store.create_job(
                gateway_pb2.RenderJob(job_id=job_id, request_id=job_id, tenant_id="acme"), "f"
            )
        ledger = Ledger()
        settlement = Settlement(store, ledger, Router())  # type: ignore[arg-type]
        reads = []
        read = store.unsettled_jobs

        async def counted(limit: int):
            reads.append(limit)
            return await read(limit)

        monkeypatch.setattr(store, "unsettled_jobs", counted)
        await settlement.settle_pending()  # the first pass reads
        assert len(reads) == 1

        async def charged(job_id: str) -> gateway_pb2.RenderJob:
            charge = event_pb2.AttemptCharge(reservation_key=f"{job_id}:0:1", outcome=RELEASE)
            return await record_charge(store, job_id, 0, 1, charge)

        settlement.charged(await charged("job_here"))
        await charged("job_elsewhere")
        await settlement.settle_pending()
        assert (ledger.told, len(reads)) == (["job_here:0:1"], 1)
        assert await store.unsettled_jobs(10) == [await store.get_job("job_elsewhere")]

        settlement.charged(await charged("job_later"))
        settlement.charged()  # a charge whose job is not at hand: read them all
        await settlement.settle_pending()
        assert sorted(ledger.told) == ["job_elsewhere:0:1", "job_here:0:1", "job_later:0:1"]
        assert await store.unsettled_jobs(10) == []
    finally:
        await store.close()
