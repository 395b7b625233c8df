"""GatewayService: the public API. Validates, stores, and hands jobs to the dispatcher."""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import grpc
import structlog
from google.protobuf import timestamp_pb2
from opentelemetry import propagate, trace

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod.metrics.v1 import metrics_pb2_grpc
from aiprod.router.v1 import router_pb2_grpc
from aiprod_gateway import limits, review, validation
from aiprod_gateway.catalog import BackendCatalog
from aiprod_gateway.dispatcher import Dispatcher
from aiprod_gateway.driving import cancel_render
from aiprod_gateway.quoting import Quoter
from aiprod_gateway.reporting import MetricsReporter
from aiprod_gateway.settlement import Settlement, record_charge
from aiprod_gateway.spending import Spending
from aiprod_gateway.store import TERMINAL_STATES, Claimed, JobStore, RequestIdConflict, TooManyUnfinished
from aiprod_gateway.tenancy import current_tenant
from aiprod_gateway.tiers import DEFAULT_TIERS, TierPolicy
from aiprod_gateway.usage import tenant_usage
from aiprod_kit.capabilities import backend_name
from aiprod_kit.database import Transaction
from aiprod_kit.errors import (
    AlreadyExists,
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
)
from aiprod_kit.failures import Reason, failure
from aiprod_kit.retention import duration

log = structlog.get_logger()


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        store: JobStore,
        dispatcher: Dispatcher,
        router: router_pb2_grpc.RouterServiceStub,
        metrics: metrics_pb2_grpc.MetricsServiceStub,
        reporter: MetricsReporter,
        spending: Spending,
        settlement: Settlement,
        quoter: Quoter,
        tiers: Mapping[int, TierPolicy] = DEFAULT_TIERS,
        job_retention_seconds: float = 0.0,
    ) -> None:
        self._store = store
        # What a NOT_FOUND adds: a job asked for long after it ended may have been deleted.
        self._not_kept = (
            f" (a job is kept {duration(job_retention_seconds)} after it ends)"
            if job_retention_seconds
            else ""
        )
        self._tiers = tiers
        self._dispatcher = dispatcher
        self._router = router
        self._metrics = metrics
        self._reporter = reporter
        self._spending = spending
        self._settlement = settlement
        self._catalog = BackendCatalog(router)
        self._quoter = quoter
        self._review = review.Review(store, quoter, self._catalog)

    async def _job(self, job_id: str) -> gateway_pb2.RenderJob:
        """The calling tenant's job; another tenant's is NOT_FOUND, exactly as one that does not exist."""
        job = await self._store.get_job(validation.job_id(job_id), current_tenant().tenant_id)
        if job is None:
            raise self._not_found(job_id)
        return job

    def _not_found(self, job_id: str) -> NotFound:
        return NotFound(
            f"job {job_id} does not exist{self._not_kept}",
            reason=ErrorReason.JOB_NOT_FOUND,
            metadata={"job_id": job_id},
        )

    async def CreateRenderJob(
        self, request: gateway_pb2.CreateRenderJobRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CreateRenderJobResponse:
        request_id = validation.request_id(request.request_id) or uuid.uuid4().hex
        tenant = current_tenant()
        fingerprint = validation.request_fingerprint(request)
        try:
            job, keep_quote, tier = await self._new_job(request, request_id)
        except ServiceError:
            # A retry of a request whose job exists gets that job, whatever would refuse a new one now
            # (a price or a budget that moved, a backend down).
            existing = await self._existing_job(tenant.tenant_id, request_id, fingerprint)
            if existing is None:
                raise
            return gateway_pb2.CreateRenderJobResponse(job=existing)
        # The job's trace: the dispatcher's work, resumed after a restart or not, continues it; the job id
        # on its first span finds it.
        trace.get_current_span().set_attribute("aiprod.job_id", job.job_id)
        trace_context: dict[str, str] = {}
        propagate.inject(trace_context)
        # A queued job is created claimed for this replica's dispatcher, while it has room.
        claim = self._dispatcher.new_job_claim() if job.state == job_pb2.JOB_STATE_QUEUED else None
        try:
            job, created = await self._store.create_job(
                job,
                fingerprint,
                trace_context,
                review.initial_revision(job),
                max_unfinished=int(tier.concurrent_jobs),
                also=keep_quote,
                claim=claim,
            )
        except TooManyUnfinished as error:
            raise limits.too_many_jobs(tenant, tier) from error
        except RequestIdConflict as error:
            raise _request_id_conflict(request_id) from error
        if created:
            log.info(
                "job created",
                job_id=job.job_id,
                tenant_id=job.tenant_id,
                preset=job.spec.preset,
                state=job_pb2.JobState.Name(job.state),
                quote_id=job.quote.quote_id,
                backend=backend_name(job.quote.backend),
                price_micros=job.quote.price.amount_micros,
                max_cost_micros=job.quote.max_cost.amount_micros,
            )
            self._reporter.job_changed(job)
            if claim is not None:
                self._dispatcher.enqueue_claimed(Claimed(job, trace_context))
            elif job.state == job_pb2.JOB_STATE_QUEUED:
                self._dispatcher.enqueue(job.job_id, job.priority)
        return gateway_pb2.CreateRenderJobResponse(job=job)

    async def _new_job(
        self, request: gateway_pb2.CreateRenderJobRequest, request_id: str
    ) -> tuple[gateway_pb2.RenderJob, Callable[[Transaction], Awaitable[None]] | None, TierPolicy]:
        """The job a request asks for, checked, planned and quoted (not stored yet); the write that keeps
        a new quote with it; the tenant's tier."""
        spec, preset = await validation.checked_spec(request.spec)
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        tenant = current_tenant()
        # The tenant's tier: the job's deadline, its quality floor at least, its longest duration.
        tier = self._tiers[tenant.tier]
        spec = limits.apply_tier(spec, tenant.tier, tier, now)
        plan = await self._catalog.plan(spec)
        await self._catalog.check_plan_renderable(plan, "spec.shots" if spec.shots else None)
        await self._spending.refuse_when_exhausted()
        # The job's quote: the one its request names, bound (refused once expired or no longer holding),
        # else a new one; a job whose cheapest route is over its price limit is refused here.
        quote, keep_quote = await self._quoter.for_job(
            request.quote_id, spec, tenant, validation.fingerprint(request.spec), request_id, plan
        )
        job = gateway_pb2.RenderJob(
            job_id=f"job_{uuid.uuid4().hex}",
            tenant_id=tenant.tenant_id,
            tier=tenant.tier,
            priority=preset.priority,
            request_id=request_id,
            state=job_pb2.JOB_STATE_AWAITING_APPROVAL
            if review.wants_review(preset, request.review)
            else job_pb2.JOB_STATE_QUEUED,
            spec=spec,
            plan=plan,
            quote=quote,
            plan_version=1,
            create_time=now,
            update_time=now,
        )
        return job, keep_quote, tier

    async def _existing_job(
        self, tenant_id: str, request_id: str, fingerprint: str
    ) -> gateway_pb2.RenderJob | None:
        try:
            return await self._store.job_for_request(tenant_id, request_id, fingerprint)
        except RequestIdConflict as error:
            raise _request_id_conflict(request_id) from error

    async def GetRenderJob(
        self, request: gateway_pb2.GetRenderJobRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetRenderJobResponse:
        return gateway_pb2.GetRenderJobResponse(job=await self._job(request.job_id))

    async def ListRenderJobs(
        self, request: gateway_pb2.ListRenderJobsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListRenderJobsResponse:
        states, page_size, cursor = validation.list_query(request)
        page = await self._store.list_jobs(current_tenant().tenant_id, states, page_size, cursor)
        return gateway_pb2.ListRenderJobsResponse(
            jobs=page.jobs, next_page_token=validation.page_token(page.next_cursor, states)
        )

    async def CancelRenderJob(
        self, request: gateway_pb2.CancelRenderJobRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CancelRenderJobResponse:
        job = await self._job(request.job_id)
        _require_unfinished(job)
        await self._dispatcher.stop_driving(job.job_id)
        reason = request.reason or "cancelled by the client"

        def cancel(job: gateway_pb2.RenderJob) -> None:
            _require_unfinished(job)  # it may have finished while the dispatcher let go of it
            job.state = job_pb2.JOB_STATE_CANCELLED
            job.error.CopyFrom(failure(Reason.CANCELLED, reason, retryable=False))

        # The job ends first: a replica driving it elsewhere then records nothing more, not even the
        # failure its render's cancel would bring.
        job = await self._store.append_event(
            job.job_id, f"cancelled: {reason}", cancel, details=review.cancellation(reason)
        )
        # Here, whichever replica drove the job: that one may be away, and stops on its own once it
        # finds the job ended (and cancels a render it started but could not record).
        running = [
            status for status in job.shots if status.HasField("handle") and not _attempt_ended(job, status)
        ]
        for status in running:
            charge = await cancel_render(self._router, job.job_id, status.handle)
            if charge is not None:
                job = await record_charge(self._store, job.job_id, status.index, status.attempt, charge)
                self._settlement.charged(job)
        self._reporter.job_changed(job)
        return gateway_pb2.CancelRenderJobResponse(job=job)

    async def WatchRenderJob(
        self, request: gateway_pb2.WatchRenderJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.WatchRenderJobResponse]:
        if request.after_sequence < 0:
            raise InvalidArgument([("after_sequence", "must not be negative")])
        job_id, tenant_id = validation.job_id(request.job_id), current_tenant().tenant_id
        async with self._store.watching(job_id, request.after_sequence, tenant_id) as (job, events):
            if job is None:
                raise self._not_found(request.job_id)
            yield gateway_pb2.WatchRenderJobResponse(job=job)
            async for event in events:
                yield gateway_pb2.WatchRenderJobResponse(event=event)

    async def QuoteRender(
        self, request: gateway_pb2.QuoteRenderRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.QuoteRenderResponse:
        spec, _ = await validation.checked_spec(request.spec)
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        tenant = current_tenant()
        # Priced as the job would be: under the tenant's tier (its deadline and quality floor).
        spec = limits.apply_tier(spec, tenant.tier, self._tiers[tenant.tier], now)
        plan = await self._catalog.plan(spec)
        await self._catalog.check_plan_renderable(plan, "spec.shots" if spec.shots else None)
        quote = await self._quoter.quote(spec, tenant, validation.fingerprint(request.spec), plan=plan)
        return gateway_pb2.QuoteRenderResponse(quote=quote)

    async def ListPresets(
        self, request: gateway_pb2.ListPresetsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListPresetsResponse:
        return gateway_pb2.ListPresetsResponse(
            presets=[preset.to_proto() for preset in self._quoter.presets.values()]
        )

    async def ApproveRenderJob(
        self, request: gateway_pb2.ApproveRenderJobRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ApproveRenderJobResponse:
        job = await self._job(request.job_id)
        tenant = current_tenant()
        tier = self._tiers[tenant.tier]
        try:
            # Queued, the job counts among the tenant's jobs at once.
            job = await self._review.approve(job, request.plan_version, int(tier.concurrent_jobs))
        except TooManyUnfinished as error:
            raise limits.too_many_jobs(tenant, tier) from error
        self._dispatcher.enqueue(job.job_id, job.priority)
        self._reporter.job_changed(job)
        return gateway_pb2.ApproveRenderJobResponse(job=job)

    async def UpdateRenderManifest(
        self, request: gateway_pb2.UpdateRenderManifestRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.UpdateRenderManifestResponse:
        job = await self._job(request.job_id)
        return gateway_pb2.UpdateRenderManifestResponse(job=await self._review.update_plan(job, request))

    async def ListRenderRevisions(
        self, request: gateway_pb2.ListRenderRevisionsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListRenderRevisionsResponse:
        job = await self._job(request.job_id)
        return gateway_pb2.ListRenderRevisionsResponse(revisions=await self._review.revisions(job))

    async def GetUsage(
        self, request: gateway_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetUsageResponse:
        """The calling tenant's jobs and spend (see aiprod_gateway.usage)."""
        return await tenant_usage(self._store, self._metrics, current_tenant(), request)


def _attempt_ended(job: gateway_pb2.RenderJob, shot: gateway_pb2.ShotStatus) -> bool:
    """Whether a shot's current attempt has ended at its backend already (its charge is known)."""
    return any(
        attempt.shot == shot.index and attempt.attempt == shot.attempt and attempt.HasField("charge")
        for attempt in job.attempts
    )


def _require_unfinished(job: gateway_pb2.RenderJob) -> None:
    if job.state in TERMINAL_STATES:
        raise FailedPrecondition(
            f"job {job.job_id} has already ended ({job_pb2.JobState.Name(job.state)})",
            reason=ErrorReason.JOB_WRONG_STATE,
            metadata=_state_metadata(job),
        )


def _state_metadata(job: gateway_pb2.RenderJob) -> dict[str, object]:
    """A FAILED_PRECONDITION's metadata: the job and the state it is in ("JOB_STATE_SUCCEEDED")."""
    return {"job_id": job.job_id, "state": job_pb2.JobState.Name(job.state)}


def _request_id_conflict(request_id: str) -> AlreadyExists:
    return AlreadyExists(
        f"request_id {request_id} was already used for a different request",
        reason=ErrorReason.JOB_ALREADY_EXISTS,
        metadata={"request_id": request_id},
    )
