"""Quotes: what a render would cost the calling tenant now, and a promise that a job created with the
quote keeps that route and price.

A quote asks the router's PlanRoute, for the tenant, for the route it would take now and lists every
backend's estimate (whether it qualifies, why not, its rank, cost and latency). Its price is the route's
estimated cost; its max_cost is the job's limit; its saving is measured against the configured baseline
backend (`AIPROD_GATEWAY_BASELINE_BACKEND`, Runway by default), priced from the router's own estimate
for it, whether it qualifies or not.

The job's limit is the request's own `constraints.max_cost` when it sets one (the caller then accepts
that price, above the preset's limit or under it), else the preset's price limit for the video's
duration. The router is asked for its route within that limit, so a backend over it (a preferred one
included) is left out, with its reason in the estimates, and the job's attempts together never cost
more (the router holds every attempt of the job to it). When nothing qualifies but for the limit, the
quote is refused: FAILED_PRECONDITION (PRICE_LIMIT) naming the cheapest price. When nothing qualifies
at all: FAILED_PRECONDITION (NO_BACKEND), naming why for each backend.

Today's budget is the one exclusion a job waits out (the gateway's budget policy): when no backend
qualifies now only because the budget left cannot pay it, the quote prices the route the job will take
once it can, rather than refusing the job.

A quote is kept (`QuoteStore`, its own table on the gateway's database) with its tenant, the
fingerprint of the request it priced (`validation.fingerprint` of the request's spec, as the job store
tells retries apart) and its expiry. `CreateRenderJob` naming it binds it (`Quoter.bind`):
another tenant's or an unknown quote is NOT_FOUND; another spec's is QUOTE_MISMATCH; an expired one
QUOTE_EXPIRED; one whose backend no longer qualifies (the router asked again) QUOTE_NOT_HOLDING, with
the router's reasons. A quote binds one job: the first request to take it (a retry of that request
finds its job, whatever the time; another request gets QUOTE_USED). A job created without a quote is
quoted then, and takes that quote, kept in the job's own transaction (a retry of its request finds the
job, with the quote it was given).

The job keeps its quote (`RenderJob.quote`; a review's re-quote replaces it) and is rendered under it
(`quoted_constraints`): its backend preferred, its max_cost the job's limit.
"""

import asyncio
import functools
import hashlib
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
import structlog
from google.protobuf import timestamp_pb2

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_gateway import validation
from aiprod_gateway.tenancy import Tenant
from aiprod_kit.capabilities import backend_name
from aiprod_kit.database import Database, Transaction
from aiprod_kit.errors import ErrorReason, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from aiprod_kit.money import usd
from aiprod_kit.presets import Preset, priced_presets
from aiprod_kit.settings import ConfigurationError, GatewaySettings

log = structlog.get_logger()

_PLAN_TIMEOUT = 5.0
# Deadlines of the rankings asked for quotes are rounded down to this: jobs created in the same moment
# ask for one ranking (a backend that fits the deadline only in its last seconds is left out).
_DEADLINE_GRAIN_SECONDS = 10
_QUOTE_ID = re.compile(r"quote_[0-9a-f]{32}")
# What a job waits out instead of being refused: the budget left today (the gateway's budget policy).
_WAITABLE = frozenset({router_pb2.EXCLUSION_OVER_BUDGET})
# What passes by itself: a renderer down, cooling down after failures, or not reached yet. A render only
# these keep out is refused as UNAVAILABLE, to be asked again, not as impossible.
_PASSING = frozenset(
    {router_pb2.EXCLUSION_NOT_SERVING, router_pb2.EXCLUSION_BREAKER_OPEN, router_pb2.EXCLUSION_NOT_REACHED}
)
# How long a caller refused for that is asked to wait: about a renderer's restart, under a breaker's
# cooldown (30 s), after which a trial render is let through.
BACKENDS_RETRY_SECONDS = 5.0
# Expired quotes are kept this long (a late retry of a create finds its job's quote), then deleted.
_RETENTION_SECONDS = 86_400.0
# Deleting them is tried at most this often, by the process that saves a quote.
_PURGE_INTERVAL_SECONDS = 60.0


def _usd(micros: int) -> str:
    return f"{micros / 1e6:.2f} USD"


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def _seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def plan_fingerprint(spec: render_pb2.RenderSpec, plan: render_pb2.RenderPlan) -> str:
    """What a review's re-quote priced: the job's spec and its edited plan (never a new job's request)."""
    return hashlib.sha256(
        (validation.fingerprint(spec) + plan.SerializeToString(deterministic=True).hex()).encode()
    ).hexdigest()


def quoted_constraints(job: gateway_pb2.RenderJob) -> render_pb2.RenderConstraints:
    """The constraints a job renders under: its request's, held to its quote (the quoted backend preferred,
    the quote's max_cost its limit)."""
    constraints = render_pb2.RenderConstraints()
    constraints.CopyFrom(job.spec.constraints)
    if job.HasField("quote"):
        if job.quote.backend:
            constraints.preferred_backend = job.quote.backend
            constraints.preferred_model = job.quote.model
        if job.quote.HasField("max_cost"):
            constraints.max_cost.CopyFrom(job.quote.max_cost)
    return constraints


# The store -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredQuote:
    quote: gateway_pb2.Quote
    tenant_id: str
    fingerprint: str
    # The request whose job took the quote ("" while none has).
    request_id: str


# quotes_request once found the quote a request took; a new job's quote is written with the job now,
# and the index, read by nothing, is dropped rather than kept up on every quote.
_SCHEMAS = {
    "sqlite": """
CREATE TABLE IF NOT EXISTS quotes (
    quote_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    expire_time REAL NOT NULL,
    quote BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS quotes_expire_time ON quotes (expire_time);
DROP INDEX IF EXISTS quotes_request;
""",
    "postgresql": """
CREATE TABLE IF NOT EXISTS quotes (
    quote_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    expire_time DOUBLE PRECISION NOT NULL,
    quote BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS quotes_expire_time ON quotes (expire_time);
DROP INDEX IF EXISTS quotes_request;
""",
}


class QuoteStore:
    """Quotes on the gateway's database (SQLite or PostgreSQL, shared by every replica). Expiry times
    are seconds since the epoch."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self._purged_at = float("-inf")

    @classmethod
    async def open(cls, database: Database) -> "QuoteStore":
        """Creates the table if needed. The database stays the caller's to close."""
        await database.create_schema(_SCHEMAS)
        return cls(database)

    async def save(self, stored: StoredQuote, now: float) -> None:
        async with self._db.transaction() as transaction:
            await self.insert(transaction, stored)
        await self.purge_due(now)

    @staticmethod
    async def insert(transaction: Transaction, stored: StoredQuote) -> None:
        """Writes the quote in the transaction: its own, or the one of the job it goes with."""
        quote = stored.quote
        await transaction.execute(
            "INSERT INTO quotes (quote_id, tenant_id, fingerprint, request_id, expire_time, quote)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                quote.quote_id,
                stored.tenant_id,
                stored.fingerprint,
                stored.request_id,
                _seconds(quote.expire_time),
                quote.SerializeToString(),
            ),
        )

    async def purge_due(self, now: float) -> None:
        """Deletes expired quotes past their retention, at most every _PURGE_INTERVAL_SECONDS."""
        if now - self._purged_at >= _PURGE_INTERVAL_SECONDS:
            self._purged_at = now
            await self.purge(now - _RETENTION_SECONDS)

    async def get(self, quote_id: str, tenant_id: str) -> StoredQuote | None:
        """The tenant's quote (None for another tenant's, exactly as for one that does not exist)."""
        row = await self._db.fetchone(
            "SELECT fingerprint, request_id, quote FROM quotes WHERE quote_id = ? AND tenant_id = ?",
            (quote_id, tenant_id),
        )
        if row is None:
            return None
        return StoredQuote(gateway_pb2.Quote.FromString(bytes(row[2])), tenant_id, row[0], row[1])

    async def take(self, quote_id: str, request_id: str) -> bool:
        """Gives the quote to the request, atomically: True when the request holds it now (it was free, or
        the request already had it), False when another request took it first."""
        async with self._db.transaction() as transaction:
            await transaction.lock(f"quote:{quote_id}")
            row = await transaction.fetchone("SELECT request_id FROM quotes WHERE quote_id = ?", (quote_id,))
            if row is None or row[0] not in ("", request_id):
                return False
            if not row[0]:
                await transaction.execute(
                    "UPDATE quotes SET request_id = ? WHERE quote_id = ?", (request_id, quote_id)
                )
            return True

    async def purge(self, expired_before: float) -> None:
        """Deletes the quotes that expired before this time."""
        async with self._db.transaction() as transaction:
            await transaction.execute("DELETE FROM quotes WHERE expire_time < ?", (expired_before,))


# Pricing ---------------------------------------------------------------------------------------------


def _holds(candidate: router_pb2.RouteCandidate) -> bool:
    """Whether the backend can take the render: now, or once today's budget can pay it."""
    return candidate.eligible or (bool(candidate.exclusions) and set(candidate.exclusions) <= _WAITABLE)


def back_soon(exclusions: Iterable[int]) -> bool:
    """Whether only what passes by itself (a renderer down, cooling down, not reached yet, or today's
    budget) keeps a backend out: a create refused for it is refused UNAVAILABLE, to be asked again."""
    return set(exclusions) <= _PASSING | _WAITABLE


def _over_limit_only(candidate: router_pb2.RouteCandidate) -> bool:
    """Whether the backend would qualify but for the job's cost limit."""
    codes = set(candidate.exclusions)
    return router_pb2.EXCLUSION_OVER_MAX_COST in codes and codes <= _WAITABLE | {
        router_pb2.EXCLUSION_OVER_MAX_COST
    }


def _priced(candidate: router_pb2.RouteCandidate) -> bool:
    """Whether the router knows the backend's price (it has reached its renderer)."""
    return router_pb2.EXCLUSION_NOT_REACHED not in candidate.exclusions


def _estimate(candidate: router_pb2.RouteCandidate) -> gateway_pb2.BackendEstimate:
    estimate = gateway_pb2.BackendEstimate(
        backend=candidate.backend,
        qualifies=candidate.eligible,
        reasons=candidate.reasons,
        rank=candidate.rank,
        model=candidate.model,
        resolution=candidate.resolution,
    )
    if _priced(candidate):
        estimate.estimated_cost.CopyFrom(candidate.estimated_cost)
    if candidate.HasField("estimated_latency"):
        estimate.estimated_latency.CopyFrom(candidate.estimated_latency)
    return estimate


@dataclass(frozen=True)
class _Limit:
    micros: int
    # Whose limit: the request's own max_cost, or its preset's price limit.
    from_request: bool

    def describe(self, preset: Preset, duration_seconds: float) -> str:
        if self.from_request:
            return f"the request's max_cost of {_usd(self.micros)}"
        return (
            f"preset {preset.name}'s limit of {_usd(self.micros)} for {duration_seconds:g} s "
            f"({preset.max_price_per_minute_usd:.2f} USD a minute)"
        )


class Quoter:
    """Prices renders for a tenant through the router, and keeps the quotes."""

    def __init__(
        self,
        router: router_pb2_grpc.RouterServiceStub,
        store: QuoteStore,
        presets: dict[str, Preset],
        baseline_backend: int = backend_pb2.BACKEND_RUNWAY,
        ttl_seconds: float = 900.0,
        clock: Callable[[], float] = time.time,
        route_cache_seconds: float = 0.0,
    ) -> None:
        self._router = router
        self._store = store
        self.presets = presets
        self._baseline = baseline_backend
        self._ttl = ttl_seconds
        self._clock = clock
        self._route_cache_seconds = route_cache_seconds
        # The router's answer to each PlanRouteRequest asked lately (serialized): when it was asked, and
        # the call (shared by the quotes that ask the same meanwhile).
        self._routes: dict[bytes, tuple[float, asyncio.Future[router_pb2.PlanRouteResponse]]] = {}

    @classmethod
    def from_settings(
        cls, settings: GatewaySettings, router: router_pb2_grpc.RouterServiceStub, store: QuoteStore
    ) -> "Quoter":
        """ConfigurationError naming the variable when a setting is wrong."""
        return cls(
            router,
            store,
            priced_presets(settings.gateway_preset_prices),
            baseline_backend(settings.gateway_baseline_backend),
            settings.gateway_quote_ttl_seconds,
            route_cache_seconds=settings.gateway_route_cache_seconds,
        )

    # What the service calls ----------------------------------------------------------------------------

    async def quote(
        self,
        spec: render_pb2.RenderSpec,
        tenant: Tenant,
        fingerprint: str,
        request_id: str = "",
        plan: render_pb2.RenderPlan | None = None,
    ) -> gateway_pb2.Quote:
        """Prices a spec as a job would render it (checked, under the tenant's tier; its plan, by default
        one shot) for the tenant, and keeps the quote under the fingerprint of the request; given a
        request_id, the quote is that request's job's already."""
        return await self._quote(spec, plan or validation.plan_of(spec), tenant, fingerprint, request_id)

    async def quote_plan(
        self, spec: render_pb2.RenderSpec, plan: render_pb2.RenderPlan, tenant: Tenant
    ) -> gateway_pb2.Quote:
        """Prices a job's edited plan (its review's re-quote) under the job's spec, and keeps the quote."""
        return await self._quote(spec, plan, tenant, plan_fingerprint(spec, plan), "")

    async def for_job(
        self,
        quote_id: str,
        spec: render_pb2.RenderSpec,
        tenant: Tenant,
        fingerprint: str,
        request_id: str,
        plan: render_pb2.RenderPlan | None = None,
    ) -> tuple[gateway_pb2.Quote, Callable[[Transaction], Awaitable[None]] | None]:
        """The quote a new job holds: the one its request names, bound, else a new one, with the write
        that keeps a new one, for the job's own transaction (JobStore.create_job's `also`): a quote is
        kept exactly when its job is. A retry of a request whose job exists gets that job from the store,
        whatever quote this makes."""
        if quote_id:
            return await self.bind(quote_id, spec, tenant, fingerprint, request_id, plan), None
        try:
            quote = await self._quote(
                spec, plan or validation.plan_of(spec), tenant, fingerprint, request_id, keep=False
            )
        except Unavailable as error:
            if error.reason != ErrorReason.ROUTER_UNAVAILABLE:
                raise
            # The router is away: the job is taken all the same, unpriced but held to its limit (the
            # router keeps to it when the job renders), rather than the accept path failing with it.
            log.warning("job accepted unquoted: the router cannot price it now", request_id=request_id)
            limit = self._limit(spec, self.presets[spec.preset], spec.duration_seconds)
            return gateway_pb2.Quote(max_cost=usd(limit.micros)), None
        await self._store.purge_due(self._clock())
        return quote, functools.partial(
            self._store.insert, stored=StoredQuote(quote, tenant.tenant_id, fingerprint, request_id)
        )

    async def bind(
        self,
        quote_id: str,
        spec: render_pb2.RenderSpec,
        tenant: Tenant,
        fingerprint: str,
        request_id: str,
        plan: render_pb2.RenderPlan | None = None,
    ) -> gateway_pb2.Quote:
        """The quote, given to the request's job if it still holds; else the reason it does not. spec: as
        the job renders it; fingerprint: of its request, which must be the quoted one's."""
        if not _QUOTE_ID.fullmatch(quote_id):
            raise InvalidArgument(
                [("quote_id", "must be a quote id such as quote_0123456789abcdef0123456789abcdef")]
            )
        stored = await self._store.get(quote_id, tenant.tenant_id)
        if stored is None:
            raise NotFound(
                f"quote {quote_id} does not exist",
                reason=ErrorReason.QUOTE_NOT_FOUND,
                metadata={"quote_id": quote_id},
            )
        quote = stored.quote
        if stored.fingerprint != fingerprint:
            raise FailedPrecondition(
                f"quote {quote_id} was made for another spec: quote this one, or send the quoted one",
                reason=ErrorReason.QUOTE_MISMATCH,
                metadata={"quote_id": quote_id},
            )
        if request_id and stored.request_id == request_id:
            return quote  # a retry of the request that took it: its job exists, whatever the time
        if stored.request_id:
            raise self._used(quote_id)
        now = self._clock()
        if now >= _seconds(quote.expire_time):
            raise FailedPrecondition(
                f"quote {quote_id} expired at {quote.expire_time.ToJsonString()}: ask for another",
                reason=ErrorReason.QUOTE_EXPIRED,
                metadata={"quote_id": quote_id, "expire_time": quote.expire_time.ToJsonString()},
            )
        await self._check_holding(quote, spec, plan or validation.plan_of(spec), tenant)
        if not await self._store.take(quote_id, request_id):
            raise self._used(quote_id)
        return quote

    # How ---------------------------------------------------------------------------------------------

    async def _plan_candidates(
        self,
        plan: render_pb2.RenderPlan,
        constraints: render_pb2.RenderConstraints,
        tenant: Tenant,
        cached: bool = True,
    ) -> list[router_pb2.RouteCandidate]:
        """The router's candidates for a whole plan, in its order. For several shots: each backend's
        summed over the shots (one PlanRoute per distinct shot shape, each under its share of the cost
        limit by duration), eligible only where it takes every shot, in the order the router ranks the
        backends for the longest shot; its latency that shot's (the shots render side by side)."""
        if len(plan.shots) == 1:
            return await self._plan_route(plan.shots[0], constraints, tenant, cached)
        total = sum(shot.duration_seconds for shot in plan.shots)
        shapes: dict[tuple[float, int, bool], list[render_pb2.Shot]] = {}
        for shot in plan.shots:
            has_image = bool(shot.first_frame.data or shot.first_frame.uri or shot.continuous)
            shapes.setdefault((shot.duration_seconds, shot.aspect_ratio, has_image), []).append(shot)
        routes = []
        for shots in sorted(shapes.values(), key=lambda same: -same[0].duration_seconds):
            share = render_pb2.RenderConstraints()
            share.CopyFrom(constraints)
            if constraints.HasField("max_cost"):
                share.max_cost.amount_micros = math.floor(
                    constraints.max_cost.amount_micros * shots[0].duration_seconds / total
                )
            routes.append((len(shots), await self._plan_route(shots[0], share, tenant, cached)))
        combined = []
        for lead in routes[0][1]:
            merged = router_pb2.RouteCandidate(
                backend=lead.backend,
                eligible=True,
                estimated_latency=lead.estimated_latency,
                model=lead.model,
                resolution=lead.resolution,
            )
            offer = (lead.backend, lead.model, lead.resolution)
            cost = 0
            for count, candidates in routes:
                same = next((c for c in candidates if (c.backend, c.model, c.resolution) == offer), None)
                if same is None:
                    merged.eligible = False
                    continue
                merged.eligible = merged.eligible and same.eligible
                cost += count * same.estimated_cost.amount_micros
                merged.reasons.extend(why for why in same.reasons if why not in merged.reasons)
                merged.exclusions.extend(kind for kind in same.exclusions if kind not in merged.exclusions)
            merged.estimated_cost.CopyFrom(usd(cost))
            combined.append(merged)
        rank = 0
        for candidate in combined:
            if candidate.eligible:
                rank += 1
                candidate.rank = rank
        return combined

    async def _plan_route(
        self,
        shot: render_pb2.Shot,
        constraints: render_pb2.RenderConstraints,
        tenant: Tenant,
        cached: bool,
    ) -> list[router_pb2.RouteCandidate]:
        """The router's ranking for the shot; cached: for a new quote, the one asked for the same in the
        last AIPROD_GATEWAY_ROUTE_CACHE_SECONDS will do."""
        request = router_pb2.PlanRouteRequest(shot=shot, constraints=constraints, tenant_id=tenant.tenant_id)
        if not cached or self._route_cache_seconds <= 0:
            return list((await self._ask_router(request)).candidates)
        if request.constraints.HasField("deadline"):
            request.constraints.deadline.seconds -= (
                request.constraints.deadline.seconds % _DEADLINE_GRAIN_SECONDS
            )
            request.constraints.deadline.nanos = 0
        key = request.SerializeToString(deterministic=True)
        now = self._clock()
        for stale in [
            k for k, (asked, _) in self._routes.items() if now - asked >= self._route_cache_seconds
        ]:
            del self._routes[stale]
        if key not in self._routes:
            self._routes[key] = (now, asyncio.ensure_future(self._ask_router(request)))
        answer = self._routes[key][1]
        try:
            # Shielded: a quote whose caller went away leaves the call to the others.
            return list((await asyncio.shield(answer)).candidates)
        except Unavailable:
            if key in self._routes and self._routes[key][1] is answer:
                del self._routes[key]  # a failed call is not kept: the next quote asks again
            raise

    async def _ask_router(self, request: router_pb2.PlanRouteRequest) -> router_pb2.PlanRouteResponse:
        try:
            return await self._router.PlanRoute(request, timeout=_PLAN_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            raise Unavailable(
                f"the router cannot price renders now ({error.code().name})",
                reason=ErrorReason.ROUTER_UNAVAILABLE,
            ) from error

    def _limit(self, spec: render_pb2.RenderSpec, preset: Preset, duration_seconds: float) -> _Limit:
        if spec.constraints.HasField("max_cost"):
            return _Limit(spec.constraints.max_cost.amount_micros, from_request=True)
        return _Limit(preset.price_limit_micros(duration_seconds), from_request=False)

    async def _quote(
        self,
        spec: render_pb2.RenderSpec,
        plan: render_pb2.RenderPlan,
        tenant: Tenant,
        fingerprint: str,
        request_id: str,
        keep: bool = True,
    ) -> gateway_pb2.Quote:
        """The quote, kept in the store unless keep is False (the caller keeps it with its job)."""
        preset = self.presets[spec.preset]
        duration = sum(each.duration_seconds for each in plan.shots)
        limit = self._limit(spec, preset, duration)
        constraints = render_pb2.RenderConstraints()
        constraints.CopyFrom(spec.constraints)
        constraints.max_cost.CopyFrom(usd(limit.micros))
        candidates = await self._plan_candidates(plan, constraints, tenant)
        route = next((candidate for candidate in candidates if _holds(candidate)), None)
        if route is None:
            raise _refusal(candidates, limit, preset, duration)
        now = self._clock()
        price = route.estimated_cost.amount_micros
        quote = gateway_pb2.Quote(
            quote_id=f"quote_{uuid.uuid4().hex}",
            create_time=_timestamp(now),
            expire_time=_timestamp(now + self._ttl),
            backend=route.backend,
            model=route.model,
            resolution=route.resolution,
            estimated_cost=usd(price),
            price=usd(price),
            max_cost=usd(limit.micros),
            estimates=[_estimate(route)] + [_estimate(c) for c in candidates if c is not route],
            baseline_backend=self._baseline,
        )
        baseline = next((c for c in candidates if c.backend == self._baseline and _priced(c)), None)
        if baseline is not None:
            quote.baseline_cost.CopyFrom(baseline.estimated_cost)
            quote.savings.CopyFrom(usd(baseline.estimated_cost.amount_micros - price))
        cheapest = min((c.estimated_cost.amount_micros for c in candidates if c.eligible), default=price)
        if cheapest < price:
            # The route is dearer than it must be (the request's preferred backend, or the best quality
            # a large budget buys): what the cheapest qualifying one would cost.
            quote.cheapest_cost.CopyFrom(usd(cheapest))
        if keep:
            # A quote asked for on its own (GetQuote, a review's re-quote); a job's own quote is told on
            # its "job created" line, one line a create rather than two.
            await self._store.save(StoredQuote(quote, tenant.tenant_id, fingerprint, request_id), now)
            log.info(
                "quoted",
                quote_id=quote.quote_id,
                tenant_id=tenant.tenant_id,
                backend=backend_name(route.backend),
                price_micros=price,
                max_cost_micros=limit.micros,
            )
        return quote

    async def _check_holding(
        self,
        quote: gateway_pb2.Quote,
        spec: render_pb2.RenderSpec,
        plan: render_pb2.RenderPlan,
        tenant: Tenant,
    ) -> None:
        """QUOTE_NOT_HOLDING unless the quoted backend still takes the render within the quote."""
        constraints = render_pb2.RenderConstraints()
        constraints.CopyFrom(spec.constraints)
        constraints.preferred_backend = quote.backend
        constraints.preferred_model = quote.model
        constraints.max_cost.CopyFrom(quote.max_cost)
        # Asked afresh: whether a quote still holds is the router's word now.
        candidates = await self._plan_candidates(plan, constraints, tenant, cached=False)
        candidate = next(
            (
                c
                for c in candidates
                if c.backend == quote.backend and (not quote.model or c.model == quote.model)
            ),
            None,
        )
        if candidate is not None and _holds(candidate):
            return
        name = backend_name(quote.backend)
        why = "; ".join(candidate.reasons) if candidate is not None else "the router no longer knows it"
        raise FailedPrecondition(
            f"quote {quote.quote_id} no longer holds: {name} cannot take the render now ({why}); ask for "
            "another",
            reason=ErrorReason.QUOTE_NOT_HOLDING,
            metadata={"quote_id": quote.quote_id, "backend": name, "why": why},
        )

    @staticmethod
    def _used(quote_id: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"quote {quote_id} is another request's: a quote binds one job",
            reason=ErrorReason.QUOTE_USED,
            metadata={"quote_id": quote_id},
        )


def _refusal(
    candidates: Sequence[router_pb2.RouteCandidate], limit: _Limit, preset: Preset, duration_seconds: float
) -> FailedPrecondition | Unavailable:
    """Why no backend can take the render: its price limit (the cheapest price named), backends that are
    down for now (UNAVAILABLE, to try again), or nothing at all."""
    over = [candidate for candidate in candidates if _over_limit_only(candidate)]
    if over:
        cheapest = min(over, key=lambda candidate: candidate.estimated_cost.amount_micros)
        cost = cheapest.estimated_cost.amount_micros
        raise_it = (
            "raise spec.constraints.max_cost" if limit.from_request else "set spec.constraints.max_cost"
        )
        return FailedPrecondition(
            f"the cheapest qualifying route, {backend_name(cheapest.backend)} at {_usd(cost)}, costs more "
            f"than {limit.describe(preset, duration_seconds)}; {raise_it} to accept it",
            reason=ErrorReason.PRICE_LIMIT,
            metadata={
                "backend": backend_name(cheapest.backend),
                "cheapest_micros": cost,
                "limit_micros": limit.micros,
                "limit": "request" if limit.from_request else "preset",
                "preset": preset.name,
            },
        )
    why = "; ".join(
        f"{backend_name(candidate.backend)}: {', '.join(candidate.reasons)}" for candidate in candidates
    )
    if any(back_soon(candidate.exclusions) for candidate in candidates):
        return Unavailable(
            f"no backend can take this render now, but one could once it is back ({why}); try again",
            reason=ErrorReason.BACKENDS_UNAVAILABLE,
            retry_after=BACKENDS_RETRY_SECONDS,
        )
    return FailedPrecondition(
        f"no backend can take this render now ({why or 'none configured'})", reason=ErrorReason.NO_BACKEND
    )


def baseline_backend(name: str) -> int:
    """AIPROD_GATEWAY_BASELINE_BACKEND's backend (runway, veo, replicate or local)."""
    key = f"BACKEND_{name.strip().upper()}"
    if key not in backend_pb2.Backend.keys() or key == "BACKEND_UNSPECIFIED":
        known = ", ".join(backend_name(value) for value in backend_pb2.Backend.values() if value)
        raise ConfigurationError(
            f"AIPROD_GATEWAY_BASELINE_BACKEND: unknown backend {name!r} (known: {known})"
        )
    return backend_pb2.Backend.Value(key)
