"""Interactive Creative Control: a job's review, before anything is reserved or spent on it.

A job whose preset has an approval step, or whose request asks for review, is created
AWAITING_APPROVAL with its plan (version 1, authored "aiprod": the gateway derived it) and its quote,
both kept as the plan's first revision. While it waits:

- `Review.update_plan` edits the plan against the version the caller last saw: a stale version gets
  ABORTED (PLAN_VERSION_STALE, the current version in its metadata) and nothing changes. The new plan is
  checked as a new job's is, re-quoted, and becomes the next version; its revision (who: the calling
  key's prefix; when; what changed, as field paths such as "shots[0].prompt"; the plan; the quote) is
  written in the transaction of the event that announces it (`plan_updated` and `quoted`), so that
  neither exists without the other. Every revision is kept (`Review.revisions`).
- `Review.approve` approves one version, the current one (else ABORTED): the job is queued, its event's
  `approved` naming the version and the approver. Money is reserved only once the dispatcher sends the
  job's first attempt, as for any job.
- a cancel ends it, with nothing spent; its event's `cancelled` says why and who (`cancellation`).

A job in no review never waits: it is created QUEUED at version 1 and keeps no revisions.
"""

from typing import Protocol

from google.protobuf import message as protobuf_message
from google.protobuf import timestamp_pb2

from aiprod.common.v1 import job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_gateway import images, planning, validation
from aiprod_gateway.catalog import BackendCatalog
from aiprod_gateway.store import JobStore
from aiprod_gateway.tenancy import Tenant, current_tenant
from aiprod_kit.errors import Aborted, ErrorReason, FailedPrecondition, InvalidArgument
from aiprod_kit.presets import PRESETS, Preset

# The author of the plan a job is created with: the gateway, which derived it from the request.
GATEWAY_AUTHOR = "aiprod"
# The only field of a plan an edit may name in its update mask (empty: the whole plan).
_EDITABLE_PATHS = ([], ["shots"])


class PlanQuoter(Protocol):
    """Prices a plan for a tenant (`aiprod_gateway.quoting.Quoter`)."""

    async def quote_plan(
        self, spec: render_pb2.RenderSpec, plan: render_pb2.RenderPlan, tenant: Tenant
    ) -> gateway_pb2.Quote: ...


def wants_review(preset: Preset, review_requested: bool) -> bool:
    """Whether a new job waits for approval: its preset has an approval step, or its request asks."""
    return preset.requires_approval or review_requested


def initial_revision(job: gateway_pb2.RenderJob) -> gateway_pb2.PlanRevision | None:
    """The first revision of a new job's plan, for the store to keep with the job, when the job is
    created in review (None otherwise): version 1, the gateway's, with the job's quote."""
    if job.state != job_pb2.JOB_STATE_AWAITING_APPROVAL:
        return None
    revision = gateway_pb2.PlanRevision(
        plan_version=job.plan_version or 1,
        create_time=job.create_time,
        author=GATEWAY_AUTHOR,
        plan=job.plan,
    )
    if job.HasField("quote"):
        revision.quote.CopyFrom(job.quote)
    return revision


def cancellation(reason: str) -> gateway_pb2.JobEvent:
    """The typed part of a cancel's event: why, and who (the calling key's prefix)."""
    return gateway_pb2.JobEvent(cancelled=gateway_pb2.Cancellation(reason=reason, cancelled_by=_caller()))


def plan_changes(old: render_pb2.RenderPlan, new: render_pb2.RenderPlan) -> list[str]:
    """What differs between two plans, as field paths ("shots[0].prompt", "shots[1]" for a shot added
    or removed, "shots[0].first_frame" for a first frame added or removed), in field order."""
    return _message_changes(old, new, "")


def _message_changes(old: protobuf_message.Message, new: protobuf_message.Message, prefix: str) -> list[str]:
    changes: list[str] = []
    for field in new.DESCRIPTOR.fields:
        path = f"{prefix}{field.name}"
        before, after = getattr(old, field.name), getattr(new, field.name)
        if field.is_repeated:
            if field.message_type is None:
                if list(before) != list(after):
                    changes.append(path)
                continue
            for index in range(max(len(before), len(after))):
                item = f"{path}[{index}]"
                if index >= len(before) or index >= len(after):
                    changes.append(item)
                else:
                    changes += _message_changes(before[index], after[index], f"{item}.")
        elif field.message_type is not None:
            if old.HasField(field.name) != new.HasField(field.name):
                changes.append(path)
            elif before != after:
                changes += _message_changes(before, after, f"{path}.")
        elif before != after:
            changes.append(path)
    return changes


def edited_plan(plan: render_pb2.RenderPlan, spec: render_pb2.RenderSpec) -> render_pb2.RenderPlan:
    """An edited plan as the job keeps it: a shot without an aspect ratio takes the job's, one without a
    seed the planner's for its place; inline images carry the media type their bytes hold."""
    edited = render_pb2.RenderPlan()
    edited.CopyFrom(plan)
    for index, shot in enumerate(edited.shots):
        shot.aspect_ratio = shot.aspect_ratio or spec.aspect_ratio
        shot.resolution = shot.resolution or spec.resolution
        shot.seed = shot.seed or planning.shot_seed(spec.seed, index)
        for image in (shot.first_frame, *shot.reference_images):
            images.normalize_mime_type(image)
    return edited


def _plan_violations(
    request: gateway_pb2.UpdateRenderManifestRequest, preset: Preset
) -> list[tuple[str, str]]:
    violations = []
    if request.plan_version <= 0:
        violations.append(
            ("plan_version", "must be the plan version last seen (the job's plan_version, from 1)")
        )
    if list(request.update_mask.paths) not in _EDITABLE_PATHS:
        violations.append(("update_mask", "only the path 'shots' can be updated"))
    if not request.plan.shots:
        violations.append(("plan.shots", "must hold at least one shot"))
    violations += validation.shot_violations(request.plan.shots, "plan.shots", preset.max_duration_seconds)
    return violations


def current_version(job: gateway_pb2.RenderJob) -> int:
    """The job's plan version (a job stored before versions were kept is at 1)."""
    return job.plan_version or 1


def _require_awaiting(job: gateway_pb2.RenderJob, message: str) -> None:
    if job.state != job_pb2.JOB_STATE_AWAITING_APPROVAL:
        raise FailedPrecondition(
            message,
            reason=ErrorReason.JOB_WRONG_STATE,
            metadata={"job_id": job.job_id, "state": job_pb2.JobState.Name(job.state)},
        )


def _require_current(job: gateway_pb2.RenderJob, plan_version: int) -> None:
    current = current_version(job)
    if plan_version != current:
        raise Aborted(
            f"plan version {plan_version} of job {job.job_id} is not the current one ({current}):"
            " read the job again",
            reason=ErrorReason.PLAN_VERSION_STALE,
            metadata={"job_id": job.job_id, "current_version": current},
        )


def _caller() -> str:
    """Who is calling, as revisions, approvals and cancels record it: the API key's prefix."""
    return current_tenant().key_prefix


def _now() -> timestamp_pb2.Timestamp:
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return now


class Review:
    """Edits, approvals and the revision history of jobs awaiting approval. The job handed in is the
    caller's own (the service looks it up for the calling tenant); each change is checked again against
    the stored job, under its lock, in the transaction that makes it."""

    def __init__(self, store: JobStore, quoter: PlanQuoter, catalog: BackendCatalog) -> None:
        self._store = store
        self._quoter = quoter
        self._catalog = catalog

    async def update_plan(
        self, job: gateway_pb2.RenderJob, request: gateway_pb2.UpdateRenderManifestRequest
    ) -> gateway_pb2.RenderJob:
        """UpdateRenderManifest: the edited plan becomes the job's next version, re-quoted, its revision
        kept; the job as updated. INVALID_ARGUMENT, FAILED_PRECONDITION (not awaiting approval) or ABORTED
        (a stale version) change nothing."""
        violations = _plan_violations(request, PRESETS[job.spec.preset])
        if violations:
            raise InvalidArgument(violations)
        await validation.check_shot_hosts(request.plan.shots, "plan.shots")
        awaiting = "only the plan of a job awaiting approval can change"
        _require_awaiting(job, awaiting)
        _require_current(job, request.plan_version)
        plan = edited_plan(request.plan, job.spec)
        await self._catalog.check_plan_renderable(plan, "plan.shots")
        tenant = current_tenant()
        quote = await self._quoter.quote_plan(job.spec, plan, tenant)
        version = request.plan_version + 1
        details = gateway_pb2.JobEvent()

        def edit(job: gateway_pb2.RenderJob) -> None:
            # Checked again under the job's lock: another edit, an approval or a cancel may have come first.
            _require_awaiting(job, awaiting)
            _require_current(job, request.plan_version)
            revision = gateway_pb2.PlanRevision(
                plan_version=version,
                create_time=_now(),
                author=tenant.key_prefix,
                plan=plan,
                changes=plan_changes(job.plan, plan),
                quote=quote,
            )
            job.plan.CopyFrom(plan)
            job.plan_version = version
            job.quote.CopyFrom(quote)
            details.plan_updated.CopyFrom(revision)
            details.quoted.CopyFrom(quote)

        return await self._store.append_event(
            job.job_id, f"plan updated to version {version}", edit, details=details
        )

    async def approve(
        self, job: gateway_pb2.RenderJob, plan_version: int, max_unfinished: int | None = None
    ) -> gateway_pb2.RenderJob:
        """ApproveRenderJob: the job, awaiting approval at plan_version, is queued (the caller enqueues
        it), as returned; INVALID_ARGUMENT (no version), FAILED_PRECONDITION (not awaiting) or ABORTED (stale).
        max_unfinished: the tenant's jobs queued or running at most (TooManyUnfinished: not approved)."""
        if plan_version <= 0:
            raise InvalidArgument(
                [("plan_version", "must be the plan version approved (the job's plan_version, from 1)")]
            )

        def awaiting(job: gateway_pb2.RenderJob) -> None:
            _require_awaiting(
                job, f"job {job.job_id} is {job_pb2.JobState.Name(job.state)}, not awaiting approval"
            )
            _require_current(job, plan_version)

        awaiting(job)
        details = gateway_pb2.JobEvent(
            approved=gateway_pb2.Approval(plan_version=plan_version, approver=_caller())
        )

        def approve(job: gateway_pb2.RenderJob) -> None:
            awaiting(job)
            job.state = job_pb2.JOB_STATE_QUEUED

        return await self._store.append_event(
            job.job_id,
            f"approved: plan version {plan_version}",
            approve,
            details=details,
            max_unfinished=max_unfinished,
        )

    async def revisions(self, job: gateway_pb2.RenderJob) -> list[gateway_pb2.PlanRevision]:
        """ListRenderRevisions: every revision of the job's plan, oldest first."""
        return await self._store.revisions(job.job_id)
