"""Quotes: priced through a fake router's PlanRoute, kept in the quote store (SQLite, and PostgreSQL for the
store's own contract), bound by a job, or refused with the reason."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from google.protobuf import duration_pb2

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.gateway.v1 import admin_pb2, gateway_pb2
from aiprod.router.v1 import router_pb2
from aiprod_gateway import validation
from aiprod_gateway.quoting import (
    BACKENDS_RETRY_SECONDS,
    Quoter,
    QuoteStore,
    StoredQuote,
    baseline_backend,
    plan_fingerprint,
    quoted_constraints,
)
from aiprod_gateway.tenancy import Tenant
from aiprod_kit.database import Database, SqliteDatabase
from aiprod_kit.errors import ErrorReason, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from aiprod_kit.money import usd
from aiprod_kit.postgres import connect_postgres
from aiprod_kit.presets import PRESETS, priced_presets
from aiprod_kit.settings import ConfigurationError, GatewaySettings

LOCAL, RUNWAY, VEO, REPLICATE = (
    backend_pb2.BACKEND_LOCAL,
    backend_pb2.BACKEND_RUNWAY,
    backend_pb2.BACKEND_VEO,
    backend_pb2.BACKEND_REPLICATE,
)
ACME = Tenant("acme", admin_pb2.SLA_TIER_GOLD, 0)
GLOBEX = Tenant("globex", admin_pb2.SLA_TIER_GOLD, 0)
TTL = 900.0
# 6 s at today's list prices: Replicate 0.05, Runway 0.12, Veo 0.20 USD a second.
REPLICATE_COST, RUNWAY_COST, VEO_COST = 300_000, 720_000, 1_200_000
# quick_social: 8.00 USD a minute, so 0.80 USD for 6 s.
QUICK_LIMIT = 800_000


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def candidate(
    backend: int,
    cost: int,
    rank: int = 0,
    *exclusions: int,
    reasons: tuple[str, ...] = (),
) -> router_pb2.RouteCandidate:
    made = router_pb2.RouteCandidate(
        backend=backend,
        eligible=not exclusions,
        rank=rank,
        estimated_cost=usd(cost),
        estimated_latency=duration_pb2.Duration(seconds=60),
        reasons=list(reasons) or ([f"rank {rank}"] if not exclusions else ["excluded"] * len(exclusions)),
        exclusions=list(exclusions),
    )
    return made


# The router's answer for a quick_social 6 s shot within its limit: Replicate first, Runway second, Veo
# over the limit, local under the floor.
WITHIN_LIMIT = [
    candidate(REPLICATE, REPLICATE_COST, 1),
    candidate(RUNWAY, RUNWAY_COST, 2),
    candidate(
        VEO, VEO_COST, 0, router_pb2.EXCLUSION_OVER_MAX_COST, reasons=("cost 1.20 USD over the limit",)
    ),
    candidate(LOCAL, 0, 0, router_pb2.EXCLUSION_UNDER_QUALITY_FLOOR),
]


class FakeRouter:
    """PlanRoute answered by `plan` (the request in, the candidates out); every request kept."""

    def __init__(
        self, plan: Callable[[router_pb2.PlanRouteRequest], list[router_pb2.RouteCandidate]]
    ) -> None:
        self.plan = plan
        self.requests: list[router_pb2.PlanRouteRequest] = []
        self.down = False

    async def PlanRoute(
        self, request: router_pb2.PlanRouteRequest, timeout: float
    ) -> router_pb2.PlanRouteResponse:
        self.requests.append(request)
        if self.down:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="down"
            )
        return router_pb2.PlanRouteResponse(candidates=self.plan(request))


def raw(**fields: object) -> render_pb2.RenderSpec:
    """A request's spec: 6 s of a fox in the snow unless told."""
    return render_pb2.RenderSpec(**{"prompt": "A fox in the snow", "duration_seconds": 6, **fields})  # type: ignore[arg-type]


def spec(**fields: object) -> render_pb2.RenderSpec:
    """The request's spec as the gateway has it after validation (quick_social's defaults applied)."""
    checked, _ = validation.normalized_spec(raw(**fields), validation.ImagePolicy())
    return checked


def fp(**fields: object) -> str:
    """The fingerprint of the request."""
    return validation.fingerprint(raw(**fields))


@pytest.fixture
async def store(tmp_path) -> AsyncIterator[QuoteStore]:
    database = SqliteDatabase(tmp_path / "jobs.sqlite3", "jobs", private=True)
    yield await QuoteStore.open(database)
    await database.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def quoter_for(
    store: QuoteStore, clock: Clock, candidates: list[router_pb2.RouteCandidate] | None = None, **options
) -> tuple[Quoter, FakeRouter]:
    router = FakeRouter(lambda request: list(candidates if candidates is not None else WITHIN_LIMIT))
    quoter = Quoter(router, store, options.pop("presets", PRESETS), ttl_seconds=TTL, clock=clock, **options)  # type: ignore[arg-type]
    return quoter, router


# A quote ---------------------------------------------------------------------------------------------


async def test_a_quote_prices_the_route_lists_every_estimate_and_is_kept(store, clock):
    quoter, router = quoter_for(store, clock)
    quote = await quoter.quote(spec(), ACME, fp())
    assert quote.quote_id.startswith("quote_") and len(quote.quote_id) == len("quote_") + 32
    assert quote.create_time.ToNanoseconds() == round(clock.now * 1e9)
    assert quote.expire_time.ToNanoseconds() - quote.create_time.ToNanoseconds() == TTL * 1e9
    assert quote.backend == REPLICATE
    assert quote.price.amount_micros == quote.estimated_cost.amount_micros == REPLICATE_COST
    assert quote.max_cost.amount_micros == QUICK_LIMIT
    assert [
        (estimate.backend, estimate.qualifies, estimate.rank, estimate.estimated_cost.amount_micros)
        for estimate in quote.estimates
    ] == [
        (REPLICATE, True, 1, REPLICATE_COST),
        (RUNWAY, True, 2, RUNWAY_COST),
        (VEO, False, 0, VEO_COST),
        (LOCAL, False, 0, 0),
    ]
    assert list(quote.estimates[2].reasons) == ["cost 1.20 USD over the limit"]
    assert quote.estimates[0].estimated_latency.seconds == 60
    # The saving against Runway, from the router's own estimate for it.
    assert quote.baseline_backend == RUNWAY
    assert quote.baseline_cost.amount_micros == RUNWAY_COST
    assert quote.savings.amount_micros == RUNWAY_COST - REPLICATE_COST
    assert not quote.HasField("cheapest_cost")  # the route is the cheapest
    # The router was asked for the tenant, within the preset's limit, with the spec's other constraints.
    [request] = router.requests
    assert request.tenant_id == "acme"
    assert request.constraints.max_cost.amount_micros == QUICK_LIMIT
    assert request.constraints.quality_floor == PRESETS["quick_social"].quality_floor
    assert request.shot.duration_seconds == 6 and request.shot.prompt == "A fox in the snow"
    stored = await store.get(quote.quote_id, "acme")
    assert stored == StoredQuote(quote, "acme", fp(), "")


async def test_the_baseline_is_priced_whether_or_not_it_qualifies_and_is_configurable(store, clock):
    runway_down = [
        candidate(REPLICATE, REPLICATE_COST, 1),
        candidate(RUNWAY, RUNWAY_COST, 0, router_pb2.EXCLUSION_NOT_SERVING),
        candidate(VEO, VEO_COST, 0, router_pb2.EXCLUSION_OVER_MAX_COST),
    ]
    quote = await quoter_for(store, clock, runway_down)[0].quote(spec(), ACME, fp())
    assert quote.baseline_cost.amount_micros == RUNWAY_COST
    against_veo = await quoter_for(store, clock, runway_down, baseline_backend=VEO)[0].quote(
        spec(), ACME, fp()
    )
    assert against_veo.baseline_backend == VEO
    assert against_veo.savings.amount_micros == VEO_COST - REPLICATE_COST
    # A baseline the router has not reached has no price: no saving is claimed.
    unreached = [
        candidate(REPLICATE, REPLICATE_COST, 1),
        candidate(RUNWAY, 0, 0, router_pb2.EXCLUSION_NOT_REACHED),
    ]
    quote = await quoter_for(store, clock, unreached)[0].quote(spec(), ACME, fp())
    assert quote.baseline_backend == RUNWAY
    assert not quote.HasField("baseline_cost") and not quote.HasField("savings")
    assert not quote.estimates[1].HasField("estimated_cost")


async def test_a_dearer_route_than_needed_says_what_the_cheapest_would_cost(store, clock):
    preferred_runway = [candidate(RUNWAY, RUNWAY_COST, 1), candidate(REPLICATE, REPLICATE_COST, 2)]
    quote = await quoter_for(store, clock, preferred_runway)[0].quote(
        spec(constraints=render_pb2.RenderConstraints(preferred_backend=RUNWAY)),
        ACME,
        fp(constraints=render_pb2.RenderConstraints(preferred_backend=RUNWAY)),
    )
    assert quote.backend == RUNWAY
    assert quote.price.amount_micros == RUNWAY_COST
    assert quote.cheapest_cost.amount_micros == REPLICATE_COST
    assert quote.savings.amount_micros == 0


async def test_the_requests_own_max_cost_is_the_jobs_limit(store, clock):
    quoter, router = quoter_for(store, clock)
    quote = await quoter.quote(
        spec(constraints=render_pb2.RenderConstraints(max_cost=usd(2_000_000))),
        ACME,
        fp(constraints=render_pb2.RenderConstraints(max_cost=usd(2_000_000))),
    )
    assert quote.max_cost.amount_micros == 2_000_000
    assert router.requests[0].constraints.max_cost.amount_micros == 2_000_000


async def test_configured_prices_set_the_limit(store, clock):
    quoter, router = quoter_for(store, clock, presets=priced_presets('{"quick_social": 4}'))
    quote = await quoter.quote(spec(), ACME, fp())
    assert quote.max_cost.amount_micros == 400_000
    assert router.requests[0].constraints.max_cost.amount_micros == 400_000


# Refusals --------------------------------------------------------------------------------------------


async def test_a_route_over_the_presets_limit_is_refused_naming_the_cheapest_price(store, clock):
    over = [
        candidate(RUNWAY, RUNWAY_COST, 0, router_pb2.EXCLUSION_OVER_MAX_COST),
        candidate(VEO, VEO_COST, 0, router_pb2.EXCLUSION_OVER_MAX_COST, router_pb2.EXCLUSION_OVER_BUDGET),
        candidate(REPLICATE, REPLICATE_COST, 0, router_pb2.EXCLUSION_UNSUPPORTED),
        candidate(LOCAL, 0, 0, router_pb2.EXCLUSION_UNDER_QUALITY_FLOOR),
    ]
    quoter, _ = quoter_for(store, clock, over, presets=priced_presets('{"quick_social": 1}'))
    with pytest.raises(FailedPrecondition) as refused:
        await quoter.quote(spec(), ACME, fp())
    error = refused.value
    assert error.reason == ErrorReason.PRICE_LIMIT
    assert "runway at 0.72 USD" in error.message
    assert "preset quick_social's limit of 0.10 USD for 6 s (1.00 USD a minute)" in error.message
    assert error.metadata == {
        "backend": "runway",
        "cheapest_micros": "720000",
        "limit_micros": "100000",
        "limit": "preset",
        "preset": "quick_social",
    }
    with pytest.raises(FailedPrecondition) as own:
        await quoter.quote(
            spec(constraints=render_pb2.RenderConstraints(max_cost=usd(500_000))),
            ACME,
            fp(constraints=render_pb2.RenderConstraints(max_cost=usd(500_000))),
        )
    assert own.value.reason == ErrorReason.PRICE_LIMIT
    assert "the request's max_cost of 0.50 USD" in own.value.message
    assert own.value.metadata["limit"] == "request"


async def test_no_backend_at_all_is_refused_naming_why_for_each(store, clock):
    none = [
        candidate(
            RUNWAY,
            RUNWAY_COST,
            0,
            router_pb2.EXCLUSION_UNDER_QUALITY_FLOOR,
            reasons=("quality 0.5 under 0.8",),
        ),
        candidate(
            REPLICATE, REPLICATE_COST, 0, router_pb2.EXCLUSION_UNSUPPORTED, reasons=("duration: 6 s only",)
        ),
    ]
    with pytest.raises(FailedPrecondition) as refused:
        await quoter_for(store, clock, none)[0].quote(spec(), ACME, fp())
    assert refused.value.reason == ErrorReason.NO_BACKEND
    assert "runway: quality 0.5 under 0.8" in refused.value.message
    assert "replicate: duration: 6 s only" in refused.value.message


@pytest.mark.parametrize(
    "passing",
    [router_pb2.EXCLUSION_NOT_SERVING, router_pb2.EXCLUSION_BREAKER_OPEN, router_pb2.EXCLUSION_NOT_REACHED],
)
async def test_a_render_only_a_backend_down_for_now_keeps_out_is_unavailable_to_try_again(
    store, clock, passing
):
    down = [
        candidate(RUNWAY, RUNWAY_COST, 0, passing, reasons=("renderer not serving",)),
        candidate(
            REPLICATE, REPLICATE_COST, 0, router_pb2.EXCLUSION_UNSUPPORTED, reasons=("duration: 6 s only",)
        ),
    ]
    with pytest.raises(Unavailable) as refused:
        await quoter_for(store, clock, down)[0].quote(spec(), ACME, fp())
    assert refused.value.reason == ErrorReason.BACKENDS_UNAVAILABLE
    assert refused.value.retry_after == BACKENDS_RETRY_SECONDS
    assert "runway: renderer not serving" in refused.value.message


async def test_a_router_away_is_unavailable(store, clock):
    quoter, router = quoter_for(store, clock)
    router.down = True
    with pytest.raises(Unavailable) as refused:
        await quoter.quote(spec(), ACME, fp())
    assert refused.value.reason == ErrorReason.ROUTER_UNAVAILABLE
    # A job is taken all the same: unpriced, held to its preset's limit, which the router keeps to.
    unpriced, keep = await quoter.for_job("", spec(), ACME, fp(), "req-away")
    assert not unpriced.quote_id and not unpriced.backend and keep is None
    assert unpriced.max_cost.amount_micros > 0
    # A named quote is checked against the router: that one stays unavailable.
    router.down = False
    quote = await quoter.quote(spec(), ACME, fp())
    router.down = True
    with pytest.raises(Unavailable):
        await quoter.for_job(quote.quote_id, spec(), ACME, fp(), "req-bound")


async def test_a_render_the_budget_cannot_pay_today_is_quoted_at_the_route_it_will_wait_for(store, clock):
    waiting = [
        candidate(REPLICATE, REPLICATE_COST, 0, router_pb2.EXCLUSION_OVER_BUDGET),
        candidate(RUNWAY, RUNWAY_COST, 0, router_pb2.EXCLUSION_OVER_BUDGET),
        candidate(LOCAL, 0, 0, router_pb2.EXCLUSION_UNDER_QUALITY_FLOOR),
    ]
    quote = await quoter_for(store, clock, waiting)[0].quote(spec(), ACME, fp())
    assert quote.backend == REPLICATE
    assert quote.price.amount_micros == REPLICATE_COST
    assert not quote.estimates[0].qualifies  # not now: the estimates say so


# Binding ---------------------------------------------------------------------------------------------


async def test_a_quote_that_holds_binds_one_job_and_a_retry_of_its_request_finds_it(store, clock):
    quoter, router = quoter_for(store, clock)
    quote = await quoter.quote(spec(), ACME, fp())
    clock.now += TTL - 1
    assert await quoter.bind(quote.quote_id, spec(), ACME, fp(), "req-1") == quote
    # Asked again with the quoted backend preferred and the quote's limit.
    replan = router.requests[-1]
    assert replan.constraints.preferred_backend == REPLICATE
    assert replan.constraints.max_cost.amount_micros == QUICK_LIMIT
    assert replan.tenant_id == "acme"
    assert (await store.get(quote.quote_id, "acme")).request_id == "req-1"
    # The same request again, even past the expiry (its answer was lost): the same quote, no new check.
    clock.now += 10
    asked = len(router.requests)
    assert await quoter.bind(quote.quote_id, spec(), ACME, fp(), "req-1") == quote
    assert len(router.requests) == asked
    # Another request: the quote is taken.
    with pytest.raises(FailedPrecondition) as taken:
        await quoter.bind(quote.quote_id, spec(), ACME, fp(), "req-2")
    assert taken.value.reason == ErrorReason.QUOTE_USED


async def test_another_tenants_quote_is_not_found_as_an_unknown_one_and_a_malformed_id_is_invalid(
    store, clock
):
    quoter, _ = quoter_for(store, clock)
    quote = await quoter.quote(spec(), ACME, fp())
    for quote_id in (quote.quote_id, "quote_" + "0" * 32):
        with pytest.raises(NotFound) as missing:
            await quoter.bind(quote_id, spec(), GLOBEX if quote_id == quote.quote_id else ACME, fp(), "req-1")
        assert missing.value.reason == ErrorReason.QUOTE_NOT_FOUND
        assert missing.value.metadata == {"quote_id": quote_id}
        assert missing.value.message == f"quote {quote_id} does not exist"
    with pytest.raises(InvalidArgument) as malformed:
        await quoter.bind("quote-1", spec(), ACME, fp(), "req-1")
    assert malformed.value.violations[0][0] == "quote_id"


async def test_a_quote_of_another_spec_does_not_bind(store, clock):
    quoter, _ = quoter_for(store, clock)
    quote = await quoter.quote(spec(), ACME, fp())
    with pytest.raises(FailedPrecondition) as mismatch:
        await quoter.bind(
            quote.quote_id, spec(prompt="A wolf in the snow"), ACME, fp(prompt="A wolf in the snow"), "req-1"
        )
    assert mismatch.value.reason == ErrorReason.QUOTE_MISMATCH
    assert (await store.get(quote.quote_id, "acme")).request_id == ""  # nobody took it
    assert await quoter.bind(quote.quote_id, spec(), ACME, fp(), "req-1") == quote


async def test_an_expired_quote_is_refused_with_its_expiry(store, clock):
    quoter, _ = quoter_for(store, clock)
    quote = await quoter.quote(spec(), ACME, fp())
    clock.now += TTL
    with pytest.raises(FailedPrecondition) as expired:
        await quoter.bind(quote.quote_id, spec(), ACME, fp(), "req-1")
    assert expired.value.reason == ErrorReason.QUOTE_EXPIRED
    assert expired.value.metadata["expire_time"] == quote.expire_time.ToJsonString()
    assert quote.expire_time.ToJsonString() in expired.value.message
    assert (await store.get(quote.quote_id, "acme")).request_id == ""  # nobody took it


async def test_a_quote_whose_backend_no_longer_qualifies_does_not_hold(store, clock):
    answers = [WITHIN_LIMIT]
    router = FakeRouter(lambda request: answers[-1])
    quoter = Quoter(router, store, PRESETS, ttl_seconds=TTL, clock=clock)  # type: ignore[arg-type]
    quote = await quoter.quote(spec(), ACME, fp())
    answers.append(
        [
            candidate(RUNWAY, RUNWAY_COST, 1),
            candidate(
                REPLICATE,
                REPLICATE_COST,
                0,
                router_pb2.EXCLUSION_BREAKER_OPEN,
                reasons=("breaker open after recent failures: cooling down",),
            ),
        ]
    )
    with pytest.raises(FailedPrecondition) as gone:
        await quoter.bind(quote.quote_id, spec(), ACME, fp(), "req-1")
    assert gone.value.reason == ErrorReason.QUOTE_NOT_HOLDING
    assert gone.value.metadata["backend"] == "replicate"
    assert "breaker open after recent failures" in gone.value.message
    # Waiting for today's budget is not a quote gone: the job waits, as any job.
    answers.append([candidate(REPLICATE, REPLICATE_COST, 0, router_pb2.EXCLUSION_OVER_BUDGET)])
    assert await quoter.bind(quote.quote_id, spec(), ACME, fp(), "req-1") == quote


async def test_a_job_without_a_quote_takes_a_new_one_kept_only_with_its_job(tmp_path, clock):
    database = SqliteDatabase(tmp_path / "quotes.sqlite3", "jobs", private=True)
    store = await QuoteStore.open(database)
    quoter, _ = quoter_for(store, clock)
    quote, keep = await quoter.for_job("", spec(), ACME, fp(), "req-1")
    assert quote.quote_id.startswith("quote_") and keep is not None
    # Not kept until the job's transaction writes it: a request whose job was never stored has none.
    assert await store.get(quote.quote_id, "acme") is None
    async with database.transaction() as transaction:
        await keep(transaction)
    kept = await store.get(quote.quote_id, "acme")
    assert kept is not None and (kept.quote, kept.request_id) == (quote, "req-1")
    # Bound by its id afterwards: the request that took it (a retry) gets it, another is refused.
    assert await quoter.for_job(quote.quote_id, spec(), ACME, fp(), "req-1") == (quote, None)
    with pytest.raises(FailedPrecondition) as taken:
        await quoter.for_job(quote.quote_id, spec(), ACME, fp(), "req-2")
    assert taken.value.reason == ErrorReason.QUOTE_USED
    await database.close()


async def test_a_plan_is_quoted_for_its_first_shot_and_its_whole_length(store, clock):
    quoter, router = quoter_for(store, clock)
    plan = render_pb2.RenderPlan(
        shots=[
            render_pb2.Shot(
                prompt="An edited shot", duration_seconds=9, aspect_ratio=render_pb2.ASPECT_RATIO_16_9
            )
        ]
    )
    quote = await quoter.quote_plan(spec(), plan, ACME)
    assert router.requests[0].shot.prompt == "An edited shot"
    assert quote.max_cost.amount_micros == 1_200_000  # 9 s at 8.00 USD a minute
    stored = await store.get(quote.quote_id, "acme")
    assert stored is not None and stored.fingerprint == plan_fingerprint(spec(), plan)
    # A review's quote is the job's: a new job of the spec cannot take it.
    with pytest.raises(FailedPrecondition) as other:
        await quoter.bind(quote.quote_id, spec(), ACME, fp(), "req-1")
    assert other.value.reason == ErrorReason.QUOTE_MISMATCH


def test_a_job_renders_held_to_its_quote():
    job = gateway_pb2.RenderJob(spec=spec(constraints=render_pb2.RenderConstraints(preferred_backend=VEO)))
    assert quoted_constraints(job) == job.spec.constraints
    job.quote.CopyFrom(gateway_pb2.Quote(backend=REPLICATE, max_cost=usd(QUICK_LIMIT)))
    constraints = quoted_constraints(job)
    assert constraints.preferred_backend == REPLICATE
    assert constraints.max_cost.amount_micros == QUICK_LIMIT
    assert constraints.quality_floor == job.spec.constraints.quality_floor
    assert job.spec.constraints.preferred_backend == VEO  # the request stays as asked


# Configuration ---------------------------------------------------------------------------------------


def test_settings_make_the_quoter_and_wrong_ones_name_their_variable(store):
    settings = GatewaySettings(
        gateway_baseline_backend="veo",
        gateway_preset_prices='{"premium_spot": 30}',
        gateway_quote_ttl_seconds=60,
    )
    quoter = Quoter.from_settings(settings, FakeRouter(lambda request: []), store)  # type: ignore[arg-type]
    assert quoter.presets["premium_spot"].max_price_per_minute_usd == 30
    assert baseline_backend(" Runway ") == RUNWAY
    for wrong, variable in (
        ({"gateway_baseline_backend": "sora"}, "AIPROD_GATEWAY_BASELINE_BACKEND"),
        ({"gateway_baseline_backend": "unspecified"}, "AIPROD_GATEWAY_BASELINE_BACKEND"),
        ({"gateway_preset_prices": '{"quick_social": -1}'}, "AIPROD_GATEWAY_PRESET_PRICES"),
    ):
        with pytest.raises(ConfigurationError) as raised:
            Quoter.from_settings(GatewaySettings(**wrong), FakeRouter(lambda request: []), store)  # type: ignore[arg-type]
        assert str(raised.value).startswith(variable)


# The store, on both databases --------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request, tmp_path) -> AsyncIterator[Database]:
    if request.param == "postgres":
        opened: Database = await connect_postgres(
            request.getfixturevalue("postgres_url"), "test", connect_timeout=5
        )
    else:
        opened = SqliteDatabase(tmp_path / "jobs.sqlite3", "jobs", private=True)
    yield opened
    await opened.close()


def stored(quote_id: str, expires: float, tenant: str = "acme") -> StoredQuote:
    quote = gateway_pb2.Quote(quote_id=quote_id, backend=RUNWAY, price=usd(720_000))
    quote.expire_time.FromNanoseconds(round(expires * 1e9))
    return StoredQuote(quote, tenant, "fingerprint", "")


async def test_the_store_keeps_quotes_per_tenant_gives_each_to_one_request_and_purges_old_ones(database):
    store = await QuoteStore.open(database)
    await QuoteStore.open(database)  # opening again changes nothing
    now = time.time()
    await store.save(stored("quote_a", now + 60), now)
    await store.save(stored("quote_old", now - 2 * 86_400), now - 2 * 86_400 + 1)
    assert (await store.get("quote_a", "acme")) == stored("quote_a", now + 60)
    assert await store.get("quote_a", "globex") is None
    assert await store.get("quote_b", "acme") is None
    assert await store.take("quote_a", "req-1")
    assert await store.take("quote_a", "req-1")  # the same request again
    assert not await store.take("quote_a", "req-2")
    assert not await store.take("quote_b", "req-1")
    assert (await store.get("quote_a", "acme")).request_id == "req-1"
    await store.purge(now - 86_400)
    assert await store.get("quote_old", "acme") is None
    assert await store.get("quote_a", "acme") is not None


# The router's rankings for quotes, cached a moment -------------------------------------------------------


async def test_quotes_of_one_kind_of_shot_share_the_routers_ranking_for_a_moment(store, clock):
    quoter, router = quoter_for(store, clock, route_cache_seconds=1.0)
    deadline = spec()
    deadline.constraints.deadline.FromSeconds(2_000_000_007)
    first = await quoter.quote(deadline, ACME, fp())
    together = await asyncio.gather(*(quoter.quote(deadline, ACME, fp()) for _ in range(5)))
    assert len(router.requests) == 1  # six quotes, one PlanRoute
    assert {quote.price.amount_micros for quote in [first, *together]} == {REPLICATE_COST}
    assert len({quote.quote_id for quote in [first, *together]}) == 6  # each its own quote
    # The deadline asked for is rounded down: a ranking shared is never laxer than its own would be.
    assert router.requests[0].constraints.deadline.seconds == 2_000_000_000
    # Another tenant, or another kind of shot, is ranked for itself; and a second later, again.
    await quoter.quote(deadline, GLOBEX, fp())
    other = spec(duration_seconds=8)
    other.constraints.deadline.FromSeconds(2_000_000_007)
    await quoter.quote(other, ACME, fp(duration_seconds=8))
    assert len(router.requests) == 3
    clock.now += 1.0
    await quoter.quote(deadline, ACME, fp())
    assert len(router.requests) == 4


async def test_whether_a_quote_still_holds_is_always_asked_afresh(store, clock):
    quoter, router = quoter_for(store, clock, route_cache_seconds=60.0)
    quote = await quoter.quote(spec(), ACME, fp())
    for request_id in ("req-1", "req-2"):
        taken = await quoter.quote(spec(), ACME, fp())
        await quoter.bind(taken.quote_id, spec(), ACME, fp(), request_id)
    binds = [request for request in router.requests if request.constraints.preferred_backend]
    assert len(binds) == 2
    assert quote.backend == REPLICATE


async def test_a_failed_ranking_is_not_kept(store, clock):
    quoter, router = quoter_for(store, clock, route_cache_seconds=60.0)
    router.down = True
    with pytest.raises(Unavailable):
        await quoter.quote(spec(), ACME, fp())
    router.down = False
    assert (await quoter.quote(spec(), ACME, fp())).backend == REPLICATE
    assert len(router.requests) == 2
