"""The review step (aiprod_gateway.review) against a real job store, SQLite and PostgreSQL, with a scripted
quoter: versions, stale edits and approvals, revisions kept with the events that announce them, and the
typed events (previous_state, plan_updated, quoted, approved, cancelled)."""

from collections.abc import AsyncIterator, Iterator

import pytest

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import admin_pb2, gateway_pb2
from aiprod_gateway import review
from aiprod_gateway.store import JobStore, SqlJobStore
from aiprod_gateway.tenancy import Tenant, set_current_tenant
from aiprod_kit.database import SqliteDatabase
from aiprod_kit.errors import Aborted, ErrorReason, FailedPrecondition, InvalidArgument
from aiprod_kit.money import usd
from aiprod_kit.postgres import connect_postgres

ALICE = Tenant("tenant-a", admin_pb2.SLA_TIER_GOLD, 0, key_prefix="aiprod_alice")
BOB = Tenant("tenant-a", admin_pb2.SLA_TIER_GOLD, 0, key_prefix="aiprod_bob")
SPEC = render_pb2.RenderSpec(
    prompt="A fox in the snow",
    preset="brand_campaign",
    duration_seconds=4,
    aspect_ratio=render_pb2.ASPECT_RATIO_16_9,
    seed=7,
)


class ScriptedQuoter:
    """Prices a plan at 10 cents a second of its shots, and remembers what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[render_pb2.RenderPlan, str]] = []

    async def quote_plan(
        self, spec: render_pb2.RenderSpec, plan: render_pb2.RenderPlan, tenant: Tenant
    ) -> gateway_pb2.Quote:
        self.asked.append((plan, tenant.tenant_id))
        price = round(sum(shot.duration_seconds for shot in plan.shots) * 100_000)
        return gateway_pb2.Quote(
            estimated_cost=usd(price), price=usd(price), backend=backend_pb2.BACKEND_REPLICATE
        )


class AnyBackend:
    """A catalog whose backends render anything but 60 s shots."""

    async def check_plan_renderable(self, plan: render_pb2.RenderPlan, field: str) -> None:
        for index, shot in enumerate(plan.shots):
            if shot.duration_seconds == 60:
                raise InvalidArgument(
                    [(f"{field}[{index}].duration_seconds", "local renders 1 to 30 s, not 60 s")]
                )


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request, tmp_path) -> AsyncIterator[JobStore]:
    if request.param == "postgres":
        database = await connect_postgres(request.getfixturevalue("postgres_url"), "test", connect_timeout=5)
    else:
        database = SqliteDatabase(tmp_path / "jobs.sqlite3", "jobs", private=True)
    opened = await SqlJobStore.open(database)
    yield opened
    await opened.close()


@pytest.fixture
def caller() -> Iterator[None]:
    set_current_tenant(ALICE)
    yield


@pytest.fixture
def quoter() -> ScriptedQuoter:
    return ScriptedQuoter()


@pytest.fixture
def reviews(store, quoter) -> review.Review:
    return review.Review(store, quoter, AnyBackend())  # type: ignore[arg-type]


def plan(prompt: str = "A fox in the snow", seconds: float = 4, **shot) -> render_pb2.RenderPlan:
    return render_pb2.RenderPlan(shots=[render_pb2.Shot(prompt=prompt, duration_seconds=seconds, **shot)])


async def new_job(
    store: JobStore, job_id: str = "job_a", preset_review: bool = True
) -> gateway_pb2.RenderJob:
    state = job_pb2.JOB_STATE_AWAITING_APPROVAL if preset_review else job_pb2.JOB_STATE_QUEUED
    job = gateway_pb2.RenderJob(
        job_id=job_id,
        request_id=f"r-{job_id}",
        tenant_id=ALICE.tenant_id,
        state=state,
        spec=SPEC,
        plan=plan(aspect_ratio=render_pb2.ASPECT_RATIO_16_9, seed=7),
        plan_version=1,
        quote=gateway_pb2.Quote(price=usd(400_000)),
    )
    job.create_time.GetCurrentTime()
    created, _ = await store.create_job(job, "fingerprint", None, review.initial_revision(job))
    return created


def edit(job: gateway_pb2.RenderJob, version: int, new_plan: render_pb2.RenderPlan):
    return gateway_pb2.UpdateRenderManifestRequest(job_id=job.job_id, plan=new_plan, plan_version=version)


async def events(store: JobStore, job_id: str) -> list[gateway_pb2.JobEvent]:
    return await store.events_after(job_id, 0)


# Pure functions --------------------------------------------------------------------------------------


def test_plan_changes_name_the_fields_that_differ():
    before = plan("A fox", 4, aspect_ratio=render_pb2.ASPECT_RATIO_16_9, seed=1)
    assert review.plan_changes(before, before) == []
    after = plan("A wolf", 5, aspect_ratio=render_pb2.ASPECT_RATIO_16_9, seed=1)
    assert review.plan_changes(before, after) == ["shots[0].prompt", "shots[0].duration_seconds"]
    framed = plan("A fox", 4, aspect_ratio=render_pb2.ASPECT_RATIO_16_9, seed=1)
    framed.shots[0].first_frame.uri = "gs://bucket/a.png"
    assert review.plan_changes(before, framed) == ["shots[0].first_frame"]
    reframed = render_pb2.RenderPlan()
    reframed.CopyFrom(framed)
    reframed.shots[0].first_frame.uri = "gs://bucket/b.png"
    assert review.plan_changes(framed, reframed) == ["shots[0].first_frame.uri"]
    two = render_pb2.RenderPlan(shots=[*before.shots, render_pb2.Shot(prompt="Then a hare")])
    assert review.plan_changes(before, two) == ["shots[1]"]
    assert review.plan_changes(two, before) == ["shots[1]"]


def test_an_edited_shot_takes_the_jobs_aspect_ratio_and_seed_unless_it_has_its_own():
    edited = review.edited_plan(plan(), SPEC)
    assert (edited.shots[0].aspect_ratio, edited.shots[0].seed) == (render_pb2.ASPECT_RATIO_16_9, 7)
    own = review.edited_plan(plan(aspect_ratio=render_pb2.ASPECT_RATIO_9_16, seed=3), SPEC)
    assert (own.shots[0].aspect_ratio, own.shots[0].seed) == (render_pb2.ASPECT_RATIO_9_16, 3)


def test_review_is_the_presets_or_the_requests():
    from aiprod_kit.presets import PRESETS

    assert review.wants_review(PRESETS["brand_campaign"], False)
    assert review.wants_review(PRESETS["quick_social"], True)
    assert not review.wants_review(PRESETS["quick_social"], False)


# Against the store -----------------------------------------------------------------------------------


async def test_a_job_in_review_starts_at_version_1_with_the_gateways_revision_on_its_first_event(store):
    job = await new_job(store)
    [revision] = await store.revisions(job.job_id)
    assert (revision.plan_version, revision.author, list(revision.changes)) == (1, "aiprod", [])
    assert revision.plan == job.plan and revision.quote == job.quote
    assert revision.create_time == job.create_time
    [created] = await events(store, job.job_id)
    assert created.plan_updated == revision and created.quoted == job.quote
    assert created.previous_state == job_pb2.JOB_STATE_UNSPECIFIED
    queued = await new_job(store, "job_b", preset_review=False)
    assert await store.revisions(queued.job_id) == []
    assert not (await events(store, queued.job_id))[0].HasField("plan_updated")


async def test_an_edit_makes_the_next_version_requoted_and_kept_with_its_event(
    store, reviews, quoter, caller
):
    job = await new_job(store)
    await reviews.update_plan(job, edit(job, 1, plan("A wolf in the snow", 6)))
    edited = await store.get_job(job.job_id)
    assert edited.plan_version == 2
    assert edited.plan.shots[0].prompt == "A wolf in the snow"
    assert (edited.plan.shots[0].aspect_ratio, edited.plan.shots[0].seed) == (render_pb2.ASPECT_RATIO_16_9, 7)
    assert edited.quote.price.amount_micros == 600_000
    assert quoter.asked == [(edited.plan, ALICE.tenant_id)]
    first, second = await store.revisions(job.job_id)
    assert second.plan_version == 2 and second.author == "aiprod_alice"
    assert list(second.changes) == ["shots[0].prompt", "shots[0].duration_seconds"]
    assert second.plan == edited.plan and second.quote == edited.quote
    event = (await events(store, job.job_id))[-1]
    assert event.plan_updated == second and event.quoted == edited.quote
    assert event.state == event.previous_state == job_pb2.JOB_STATE_AWAITING_APPROVAL
    assert first.plan == job.plan  # the first revision is kept as it was


async def test_a_stale_or_missing_version_changes_nothing(store, reviews, quoter, caller):
    job = await new_job(store)
    await reviews.update_plan(job, edit(job, 1, plan("A wolf")))
    with pytest.raises(Aborted) as stale:
        # A second reviewer still on version 1.
        await reviews.update_plan(await store.get_job(job.job_id), edit(job, 1, plan("A hare")))
    assert stale.value.reason == ErrorReason.PLAN_VERSION_STALE
    assert stale.value.metadata["current_version"] == "2"
    with pytest.raises(InvalidArgument) as missing:
        await reviews.update_plan(job, edit(job, 0, plan("A hare")))
    assert [field for field, _ in missing.value.violations] == ["plan_version"]
    current = await store.get_job(job.job_id)
    assert (current.plan_version, current.plan.shots[0].prompt) == (2, "A wolf")
    assert len(await store.revisions(job.job_id)) == 2
    assert len(quoter.asked) == 1  # nothing quoted for refused edits


async def test_an_edit_that_loses_the_race_under_the_lock_changes_nothing(store, reviews, caller):
    job = await new_job(store)
    fresh = await store.get_job(job.job_id)
    await reviews.update_plan(fresh, edit(fresh, 1, plan("A wolf")))
    # The edit read the job at version 1 and passed the early check; the stored job has moved on since.
    with pytest.raises(Aborted):
        await reviews.update_plan(job, edit(job, 1, plan("A hare")))
    assert len(await store.revisions(job.job_id)) == 2


async def test_bad_edits_name_their_fields(store, reviews, caller):
    job = await new_job(store)
    too_long = render_pb2.RenderPlan(shots=[*plan(seconds=70).shots, *plan(seconds=70).shots])
    bad = [
        (plan(""), "plan.shots[0].prompt"),
        (plan(seconds=0), "plan.shots[0].duration_seconds"),
        (plan(seconds=121), "plan.shots"),  # over the preset's 120 s
        (too_long, "plan.shots"),  # 140 s in all, over the preset's 120
        (render_pb2.RenderPlan(), "plan.shots"),
        (plan(seconds=60), "plan.shots[0].duration_seconds"),  # no backend renders it
    ]
    for new_plan, field in bad:
        with pytest.raises(InvalidArgument) as refused:
            await reviews.update_plan(job, edit(job, 1, new_plan))
        assert field in [name for name, _ in refused.value.violations], (new_plan, refused.value.violations)
    assert (await store.get_job(job.job_id)).plan_version == 1


async def test_approval_of_the_current_version_queues_the_job(store, reviews, caller):
    job = await new_job(store)
    await reviews.update_plan(job, edit(job, 1, plan("A wolf")))
    with pytest.raises(InvalidArgument):
        await reviews.approve(await store.get_job(job.job_id), 0)
    with pytest.raises(Aborted) as stale:
        await reviews.approve(await store.get_job(job.job_id), 1)
    assert stale.value.metadata["current_version"] == "2"
    assert (await store.get_job(job.job_id)).state == job_pb2.JOB_STATE_AWAITING_APPROVAL
    set_current_tenant(BOB)
    await reviews.approve(await store.get_job(job.job_id), 2)
    approved = await store.get_job(job.job_id)
    assert approved.state == job_pb2.JOB_STATE_QUEUED
    event = (await events(store, job.job_id))[-1]
    assert event.approved == gateway_pb2.Approval(plan_version=2, approver="aiprod_bob")
    assert (event.previous_state, event.state) == (
        job_pb2.JOB_STATE_AWAITING_APPROVAL,
        job_pb2.JOB_STATE_QUEUED,
    )
    with pytest.raises(FailedPrecondition):
        await reviews.approve(approved, 2)
    with pytest.raises(FailedPrecondition):
        await reviews.update_plan(approved, edit(approved, 2, plan("Too late")))


async def test_a_cancel_says_why_and_who(store, caller):
    job = await new_job(store)

    def cancel(job: gateway_pb2.RenderJob) -> None:
        job.state = job_pb2.JOB_STATE_CANCELLED

    await store.append_event(job.job_id, "cancelled", cancel, details=review.cancellation("not this one"))
    event = (await events(store, job.job_id))[-1]
    assert event.cancelled == gateway_pb2.Cancellation(reason="not this one", cancelled_by="aiprod_alice")
    assert event.previous_state == job_pb2.JOB_STATE_AWAITING_APPROVAL
    assert len(await store.revisions(job.job_id)) == 1
