"""A seeded, in-process replay of mixed render jobs: what the router's policy spends against the cheapest
choice known in hindsight (the oracle), and what the first version's fixed-order policy would have
spent on the same jobs. Pure and deterministic from the seed: no services, no clock, no I/O.

The world (all drawn up front from one random.Random, so that the oracle and every policy face the
same one):

- Backends: the product's four, with the capabilities their renderers advertise with their default
  settings and the deployment's offers (k8s/base: RUNWAY_OFFERS and VEO_OFFERS below), each model a
  route candidate (the providers' own `capabilities()`: Runway gen4.5 0.12 USD/s q 0.95 2-10 s and
  gen4_turbo 0.05 q 0.90, image-to-video only; Veo 3.0 silent 0.20 q 0.92, 3.1 Fast 0.10 q 0.88 and
  3.1 Lite 0.05 q 0.80, 4/6/8 s; Replicate minimax/video-01 0.05 q 0.75 6 s 16:9; local free, q 0.5, a
  development stand-in under every floor) and their billing rules (`charge_micros` with the model: a
  delivered render bills its list price, a failed task bills nothing at any of them).
- Jobs (JOBS of them, Poisson arrivals every ARRIVAL_SECONDS on average): a preset (libs presets), a
  tenant's SLA tier (its deadline and quality minimum, as the gateway applies them), a duration of one
  shot (one shot per job, as the router renders each shot on its own), an aspect ratio, a first frame
  or not, a prompt length (a few over Runway's 1000 characters), some tighter deadlines of the
  request's own, a raised quality floor now and then, the preset's price limit as the job's cost
  limit, and the tenant's budget left today (none for uncapped tenants).
- Each job's outcome at each backend, drawn once (a provider's models share it, each billing its own
  price; a delivery is at the model's quality): delivered, failed (nothing billed) or delivered but
  rejected by QC (billed, then the router falls back), and how long the attempt takes. Latencies are
  log-normal with 90% within the first version's typical render times (SEED.md: Runway 30-60 s, Veo
  45-90 s, Replicate 60-120 s), scaled by the clip's length, with a few renders queued 2-4 times as
  long at the provider. Each provider also has one incident of INCIDENT_SECONDS, at a drawn time,
  during which most of its attempts fail fast.

Assumed, not known from the repository: the latency and failure figures in PROFILES and the incident
shape; that QC passes every delivered output at the backend's nominal quality except the drawn
rejections; that all failures are retryable (a safety refusal would end the chain at any backend);
that health stays SERVING (the router's own breaker still runs, on the replay's clock).

Policies are driven by an event simulation in arrival order: a decision sees only the outcomes that
ended before it (BackendStats and breakers learn as the router's do), an attempt that fails or is
rejected moves to the next choice, up to the router's attempt limit, paying what each attempt bills.
A job whose first attempt finds no backend, when one that could take it is only down or cooling down
(the gateway then refuses the create UNAVAILABLE with a RetryInfo: `aiprod_gateway.quoting.back_soon`),
is asked again by its client BACKENDS_RETRY_SECONDS later while its deadline (from its first asking)
allows; the first version's policy is given no such retry.

- router: the router's policy (`aiprod_router.policy.rank_backends`) on the views the router builds
  (capabilities, breaker, observed p95 and success rate), with the request it builds (quality floor,
  cost limit less what was spent, seconds left to the deadline, budget left, economy, tried).
- seed: the first version (SEED.md): by budget left, under 1 USD none, under 5 the cheapest
  (Replicate), under 35 the middle one (Veo), else the best (Runway); then the fixed order Runway,
  Veo, Replicate. It knew no floor, deadline or cost limit; it is given the capability check (a
  provider refuses an impossible request for free and at once, so that changes neither cost nor
  time). Its "3 errors: unhealthy forever" is left out: on the default replay it would mark Runway,
  Veo and Replicate dead at jobs 124, 175 and 490 (SLO attainment 0.15), which measures that bug,
  not the fixed order.
- oracle: per job, the cheapest backend that qualifies (capabilities, quality floor, cost limit,
  budget left) and, in hindsight, delivers an accepted output within the deadline. A job no backend
  can serve so counts in neither the cost nor the SLO denominators (a policy's spend on it is reported
  apart, as spend_unservable).

A job meets its SLO when a policy delivers an accepted output within its deadline from a backend that
qualifies (of nominal quality at least the job's floor, within its cost limit and its budget). For
such a job a policy's spend is never under the oracle's (its delivering attempt qualifies in
hindsight, other attempts bill 0 or more); for a job it misses, it may be, down to nothing: so
cost_vs_oracle is read with slo_attainment, and cost_vs_oracle_on_slo_met is the ratio on the met
jobs alone.
"""

import dataclasses
import functools
import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import SecretStr

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_gateway.quoting import BACKENDS_RETRY_SECONDS, back_soon
from aiprod_gateway.tiers import DEFAULT_TIERS
from aiprod_kit.breaker import CircuitBreaker
from aiprod_kit.capabilities import offer_capabilities, offers, shot_mismatches
from aiprod_kit.presets import PRESETS
from aiprod_kit.rendering.provider import ProviderTask, TaskState, VideoSource
from aiprod_kit.settings import ReplicateSettings, RouterSettings, RunwaySettings, VeoSettings
from aiprod_renderers.local.service import capabilities as local_capabilities
from aiprod_renderers.replicate.provider import ReplicateProvider
from aiprod_renderers.runway.provider import RunwayProvider
from aiprod_renderers.veo.provider import VeoProvider
from aiprod_router.policy import Candidate, RouteRequest, rank_backends, views_of
from aiprod_router.stats import BackendStats, Outcome

LOCAL, RUNWAY, VEO, REPLICATE = (
    backend_pb2.BACKEND_LOCAL,
    backend_pb2.BACKEND_RUNWAY,
    backend_pb2.BACKEND_VEO,
    backend_pb2.BACKEND_REPLICATE,
)
LANDSCAPE, PORTRAIT, SQUARE = (
    render_pb2.ASPECT_RATIO_16_9,
    render_pb2.ASPECT_RATIO_9_16,
    render_pb2.ASPECT_RATIO_1_1,
)
MICROS = 1_000_000

JOBS = 1000
SEED = 12
ARRIVAL_SECONDS = 20.0
INCIDENT_SECONDS = 20 * 60
# How long a client without a deadline keeps asking again a create refused UNAVAILABLE.
PATIENCE_SECONDS = 15 * 60

DELIVERED, FAILED, REJECTED = "delivered", "failed", "rejected"


@dataclass(frozen=True)
class Profile:
    """How a backend behaves (assumed figures, see the module's docstring)."""

    # Median seconds to render a 5 s clip; log-normal spread (0.21: 90% within a factor 2, as SEED.md's
    # ranges are).
    median_seconds: float
    spread: float
    # Chance an attempt fails (billed nothing), and that a delivered output is rejected by QC (billed).
    failure: float
    rejection: float
    # Chance a render waits 2-4 times as long in the provider's queue.
    queued: float = 0.03
    # During its incident, the chance an attempt fails, quickly.
    incident_failure: float = 0.6


PROFILES: dict[int, Profile] = {
    RUNWAY: Profile(math.sqrt(30 * 60), 0.21, 0.03, 0.01),
    VEO: Profile(math.sqrt(45 * 90), 0.21, 0.05, 0.01),
    REPLICATE: Profile(math.sqrt(60 * 120), 0.21, 0.08, 0.02),
    # The local renderer encodes on the mesh's own CPU: quick, rarely fails, never in an incident.
    LOCAL: Profile(20.0, 0.3, 0.01, 0.0, queued=0.0, incident_failure=0.0),
}
# The first version's fixed fallback order, and its budget tiers' picks (SEED.md).
SEED_ORDER = (RUNWAY, VEO, REPLICATE)
SEED_CHEAPEST, SEED_MIDDLE, SEED_BEST = REPLICATE, VEO, RUNWAY
SEED_DAILY_BUDGET_MICROS = 90 * MICROS


@dataclass(frozen=True)
class Job:
    index: int
    # Seconds from the replay's start.
    arrival: float
    preset: str
    shot: render_pb2.Shot
    quality_floor: float
    max_cost_micros: int | None
    # Seconds from arrival; None: no deadline.
    deadline_seconds: float | None
    # The tenant's budget left today; None: no cap.
    budget_remaining_micros: int | None
    economy: bool = False


@dataclass(frozen=True)
class Attempt:
    """One job's outcome at one backend, drawn once."""

    result: str  # DELIVERED, FAILED or REJECTED
    # From submission to the final event, whatever the result.
    seconds: float
    # What the provider bills for it (its renderer's charge_micros).
    charge_micros: int
    qc_score: float | None = None


# One offer of one backend, as the router chooses it: (backend, model, resolution).
Route = tuple[int, str, str]


def routes_of(
    backend: int, capabilities: renderer_pb2.Capabilities
) -> dict[Route, renderer_pb2.Capabilities]:
    """Each of a backend's offers, the default first, with the capabilities the policy ranks it by."""
    offered = offers(capabilities)
    if len(offered) == 1:
        return {(backend, offered[0].model, offered[0].resolution): capabilities}
    return {(backend, o.model, o.resolution): offer_capabilities(capabilities, o) for o in offered}


def route_of(candidate: Candidate) -> Route:
    return candidate.backend, candidate.model, candidate.resolution


@dataclass(frozen=True)
class World:
    jobs: tuple[Job, ...]
    # Each backend's capabilities, every offer in them.
    capabilities: dict[int, renderer_pb2.Capabilities]
    # outcomes[j][route]: job j's attempt at that offer of that backend.
    outcomes: tuple[dict[Route, Attempt], ...]

    @functools.cached_property
    def offers(self) -> dict[Route, renderer_pb2.Capabilities]:
        return {
            route: offered
            for backend, capabilities in self.capabilities.items()
            for route, offered in routes_of(backend, capabilities).items()
        }


def list_cost_micros(capabilities: renderer_pb2.Capabilities, shot: render_pb2.Shot) -> int:
    # As the policy computes it.
    return round(capabilities.price_per_second.amount_micros * shot.duration_seconds)


def qualifies(job: Job, capabilities: renderer_pb2.Capabilities) -> bool:
    """Whether a backend may take the job at all, before any outcome is known."""
    cost = list_cost_micros(capabilities, job.shot)
    return (
        not shot_mismatches(job.shot, capabilities)
        and capabilities.nominal_quality >= job.quality_floor
        and (job.max_cost_micros is None or cost <= job.max_cost_micros)
        and (job.budget_remaining_micros is None or cost <= job.budget_remaining_micros)
    )


def oracle_spend(world: World) -> list[int | None]:
    """Per job, what the cheapest qualifying offer (a backend's model at a resolution) that delivers in
    time in hindsight bills; None when no backend can serve the job."""
    spends: list[int | None] = []
    for job, outcomes in zip(world.jobs, world.outcomes, strict=True):
        bills = [
            attempt.charge_micros
            for route, attempt in outcomes.items()
            if attempt.result == DELIVERED
            and (job.deadline_seconds is None or attempt.seconds <= job.deadline_seconds)
            and qualifies(job, world.offers[route])
        ]
        spends.append(min(bills) if bills else None)
    return spends


# The product's configuration ----------------------------------------------------------------------


# The models the replay's renderers offer beside their defaults: Runway's gen4_turbo (image-to-video,
# 0.05 USD/s), Veo 3.1 Fast (0.10 USD/s silent) and Veo 3.1 Lite (0.05 USD/s).
RUNWAY_OFFERS = "gen4_turbo"
VEO_OFFERS = "veo-3.1-fast-generate-001,veo-3.1-lite-generate-001"

Bill = Callable[[render_pb2.Shot, bool, str], int]


def product_backends() -> dict[int, tuple[renderer_pb2.Capabilities, Bill]]:
    """Each backend's advertised capabilities (every offer) and its billing (shot, delivered, model) ->
    micro-USD, from the renderers' own code with their default settings and the offers above
    (model_construct: the environment is not read, so that the replay does not depend on who runs it).
    Building a provider does no I/O."""
    providers = [
        RunwayProvider(RunwaySettings.model_construct(offers=RUNWAY_OFFERS)),
        # A token instead of Application Default Credentials: no lookup of the machine's credentials.
        VeoProvider(
            VeoSettings.model_construct(project="replay", access_token=SecretStr("replay"), offers=VEO_OFFERS)
        ),
        ReplicateProvider(ReplicateSettings.model_construct()),
    ]
    delivered = ProviderTask(TaskState.SUCCEEDED, 1.0, (VideoSource(url="https://replay.invalid/v.mp4"),))
    failed = ProviderTask(TaskState.FAILED)
    backends: dict[int, tuple[renderer_pb2.Capabilities, Bill]] = {
        LOCAL: (local_capabilities(), lambda shot, ok, model: 0)
    }
    for provider in providers:

        def bill(shot: render_pb2.Shot, ok: bool, model: str, provider=provider) -> int:
            return provider.charge_micros(shot, delivered if ok else failed, model=model)

        backends[provider.backend] = (provider.capabilities(), bill)
    return backends


# The world ----------------------------------------------------------------------------------------

_WORDS = "a slow dolly shot over a misty harbour at dawn with gulls and warm light on the water ".split()


def _prompt(rng: random.Random, characters: int) -> str:
    words: list[str] = []
    while sum(len(word) + 1 for word in words) < characters:
        words.append(rng.choice(_WORDS))
    return " ".join(words)[:characters]


def _job(rng: random.Random, index: int, arrival: float) -> Job:
    preset = PRESETS[rng.choices(list(PRESETS), weights=(50, 35, 15))[0]]
    tier = DEFAULT_TIERS[rng.choices(list(DEFAULT_TIERS), weights=(40, 45, 15))[0]]
    duration = (
        preset.default_duration_seconds
        if rng.random() < 0.5
        else float(rng.choices((4, 5, 6, 8, 10), weights=(15, 25, 25, 25, 10))[0])
    )
    aspect = rng.choices((LANDSCAPE, PORTRAIT, SQUARE), weights=(70, 25, 5))[0]
    # Mostly short prompts; a few over Runway's 1000 characters.
    characters = rng.randint(1200, 3000) if rng.random() < 0.03 else rng.randint(40, 400)
    shot = render_pb2.Shot(prompt=_prompt(rng, characters), duration_seconds=duration, aspect_ratio=aspect)
    if rng.random() < 0.3:
        shot.first_frame.uri = f"gs://replay-frames/{index}.png"
    floor = max(preset.quality_floor, tier.quality_minimum)
    if rng.random() < 0.08:
        floor = min(round(floor + 0.05, 2), 0.95)
    # The tier's latency is the job's deadline; some requests ask sooner.
    deadline = tier.latency_seconds
    if rng.random() < 0.12:
        deadline = rng.uniform(75.0, 180.0)
    budget = None
    if rng.random() < 0.6:
        # A capped tenant somewhere in its day: the first version's daily 90 USD.
        budget = rng.randint(0, SEED_DAILY_BUDGET_MICROS)
    return Job(
        index,
        arrival,
        preset.name,
        shot,
        floor,
        preset.price_limit_micros(duration),
        deadline,
        budget,
        # The ledger's economy mode: 90% of the cap spent.
        economy=budget is not None and budget < SEED_DAILY_BUDGET_MICROS // 10,
    )


def _attempt(
    rng: random.Random,
    profile: Profile,
    shot: render_pb2.Shot,
    in_incident: bool,
    bill: Callable[[render_pb2.Shot, bool], int],
    quality: float,
) -> Attempt:
    # Every draw is made whatever the result, so that one backend's figures do not shift another's.
    latency = profile.median_seconds * math.exp(rng.gauss(0.0, profile.spread))
    # Longer clips take longer: a 10 s clip 1.5 times a 5 s one.
    latency *= 0.5 + 0.1 * shot.duration_seconds
    queued = rng.random() < profile.queued
    queue_factor = rng.uniform(2.0, 4.0)
    failed = rng.random() < profile.failure
    incident_failed = in_incident and rng.random() < profile.incident_failure
    rejected = rng.random() < profile.rejection
    failed_after = rng.uniform(0.2, 1.0)
    fast_failure = rng.uniform(2.0, 10.0)
    rejected_score = rng.uniform(0.1, 0.4)
    if queued:
        latency *= queue_factor
    if incident_failed:
        return Attempt(FAILED, fast_failure, bill(shot, False))
    if failed:
        return Attempt(FAILED, latency * failed_after, bill(shot, False))
    if rejected:
        return Attempt(REJECTED, latency, bill(shot, True), rejected_score)
    return Attempt(DELIVERED, latency, bill(shot, True), quality)


def make_world(seed: int = SEED, jobs: int = JOBS) -> World:
    rng = random.Random(seed)
    backends = product_backends()
    span = jobs * ARRIVAL_SECONDS
    incidents = {backend: rng.uniform(0.0, span) for backend in (RUNWAY, VEO, REPLICATE)}
    made: list[Job] = []
    outcomes: list[dict[Route, Attempt]] = []
    arrival = 0.0
    for index in range(jobs):
        arrival += rng.expovariate(1.0 / ARRIVAL_SECONDS)
        job = _job(rng, index, arrival)
        made.append(job)
        drawn = {}
        for backend, (capabilities, bill) in backends.items():
            start = incidents.get(backend)
            # A provider's incident is every one of its models'.
            in_incident = start is not None and start <= arrival < start + INCIDENT_SECONDS
            # One draw per provider: its models share its queue and its failures (a fallback goes to
            # another provider, as the router's does); each model bills its own price.
            routes = routes_of(backend, capabilities)
            first, *others = routes.items()
            drawn[first[0]] = _attempt(
                rng,
                PROFILES[backend],
                job.shot,
                in_incident,
                functools.partial(_bill_at, bill, first[0]),
                first[1].nominal_quality,
            )
            for route, offered in others:
                outcome = drawn[first[0]]
                drawn[route] = dataclasses.replace(
                    outcome,
                    charge_micros=_bill_at(bill, route, job.shot, outcome.result != FAILED),
                    qc_score=offered.nominal_quality if outcome.result == DELIVERED else outcome.qc_score,
                )
        outcomes.append(drawn)
    return World(tuple(made), {backend: caps for backend, (caps, _) in backends.items()}, tuple(outcomes))


def _bill_at(bill: Bill, route: Route, shot: render_pb2.Shot, ok: bool) -> int:
    """The bill of a render of the shot at the route's model and resolution."""
    at = render_pb2.Shot()
    at.CopyFrom(shot)
    at.resolution = route[2]
    return bill(at, ok, route[1])


# Policies -----------------------------------------------------------------------------------------


class Policy:
    """Chooses the backend of each attempt; learns from the attempts that ended."""

    name = ""

    def choose(self, job: Job, now: float, tried: frozenset[int], attempt: int, spent: int) -> Route | None:
        raise NotImplementedError

    def observe(self, route: Route, attempt: Attempt, now: float, job: Job) -> None:
        pass

    def retry_after(self, job: Job, now: float) -> float | None:
        """After choose found nothing for a job's first attempt: when its client asks again, if the
        refusal tells it to (None: the job is given up)."""
        return None


@dataclass
class ReplayRenderer:
    """What the router knows of one backend (the fields of aiprod_router.backends.Renderer it ranks on)."""

    backend: int
    capabilities: renderer_pb2.Capabilities
    breaker: CircuitBreaker
    serving: bool = True
    stats: BackendStats = field(default_factory=BackendStats)


# The router's defaults (model_construct: the environment is not read).
ROUTER_SETTINGS = RouterSettings.model_construct()


def route_request(job: Job, seconds_left: float | None, tried: frozenset[int], spent: int) -> RouteRequest:
    """The request the router builds for an attempt (RenderChain.route_request), with its defaults."""
    settings = ROUTER_SETTINGS
    budget = job.budget_remaining_micros
    return RouteRequest(
        shot=job.shot,
        quality_floor=job.quality_floor,
        max_cost_micros=None if job.max_cost_micros is None else max(job.max_cost_micros - spent, 0),
        seconds_left=seconds_left,
        budget_remaining_micros=None if budget is None else max(budget - spent, 0),
        economy=job.economy,
        tried=tried,
        quality_first_budget_micros=round(settings.router_quality_first_budget_usd * MICROS) or None,
    )


class RouterPolicy(Policy):
    name = "router"

    def __init__(self, capabilities: dict[int, renderer_pb2.Capabilities]) -> None:
        settings = ROUTER_SETTINGS
        self.max_attempts = settings.router_max_attempts
        self.now = 0.0
        self.renderers = [
            ReplayRenderer(
                backend,
                caps,
                # The router's breaker settings, on the replay's clock.
                CircuitBreaker(
                    settings.router_breaker_failures,
                    settings.router_breaker_cooldown_seconds,
                    clock=lambda: self.now,
                    failure_ratio=settings.router_breaker_failure_ratio,
                    window=settings.router_breaker_window,
                ),
            )
            for backend, caps in capabilities.items()
        ]
        self._by_backend = {renderer.backend: renderer for renderer in self.renderers}
        # The last decision's candidates.
        self.ranked: list[Candidate] = []

    def rank(self, request: RouteRequest) -> list[Candidate]:
        return rank_backends(request, views_of(self.renderers, request.shot.duration_seconds))

    def choose(self, job: Job, now: float, tried: frozenset[int], attempt: int, spent: int) -> Route | None:
        self.now = now
        if attempt > self.max_attempts:
            return None
        left = None if job.deadline_seconds is None else job.deadline_seconds - (now - job.arrival)
        self.ranked = self.rank(route_request(job, left, tried, spent))
        eligible = [c for c in self.ranked if c.eligible]
        if not eligible:
            return None
        chosen = eligible[0]
        self._by_backend[chosen.backend].breaker.allow_request()
        return route_of(chosen)

    def retry_after(self, job: Job, now: float) -> float | None:
        # The gateway's create refused UNAVAILABLE with a RetryInfo (a backend that could take it is
        # down or cooling down for now), and the client asks again then, while its deadline allows.
        waited = now - job.arrival + BACKENDS_RETRY_SECONDS
        if not any(back_soon(candidate.exclusions) for candidate in self.ranked):
            return None
        if waited >= (job.deadline_seconds if job.deadline_seconds is not None else PATIENCE_SECONDS):
            return None
        return BACKENDS_RETRY_SECONDS

    def observe(self, route: Route, attempt: Attempt, now: float, job: Job) -> None:
        self.now = now
        renderer = self._by_backend[route[0]]
        if attempt.result == FAILED:
            renderer.stats.record(Outcome(False, attempt.seconds))
            renderer.breaker.record_failure()
            return
        # A delivered output is a success to the router's stats and breaker, also one QC rejects.
        renderer.stats.record(
            Outcome(True, attempt.seconds, attempt.qc_score, attempt.charge_micros, job.shot.duration_seconds)
        )
        renderer.breaker.record_success()


class SeedPolicy(Policy):
    name = "seed"

    def __init__(self, capabilities: dict[int, renderer_pb2.Capabilities]) -> None:
        self.capabilities = capabilities

    def choose(self, job: Job, now: float, tried: frozenset[int], attempt: int, spent: int) -> Route | None:
        # An uncapped tenant is the seed's "large budget".
        left = (
            SEED_DAILY_BUDGET_MICROS if job.budget_remaining_micros is None else job.budget_remaining_micros
        )
        if left < 1 * MICROS:
            return None
        first = SEED_CHEAPEST if left < 5 * MICROS else SEED_MIDDLE if left < 35 * MICROS else SEED_BEST
        for backend in (first, *SEED_ORDER):
            if backend in tried or backend not in self.capabilities:
                continue
            # It knew one model per provider: the default.
            route, capabilities = next(iter(routes_of(backend, self.capabilities[backend]).items()))
            if not shot_mismatches(job.shot, capabilities):
                return route
        return None


# The simulation -----------------------------------------------------------------------------------


@dataclass
class JobResult:
    spend_micros: int = 0
    attempts: int = 0
    # The offer of the accepted output, and seconds from arrival to it; None: none delivered.
    delivered_by: Route | None = None
    seconds: float | None = None
    slo_met: bool = False


def simulate(world: World, policy: Policy) -> list[JobResult]:
    """Runs every job through the policy in time order: arrivals and attempt ends, ties by sequence."""
    results = [JobResult() for _ in world.jobs]
    tried: list[set[int]] = [set() for _ in world.jobs]
    # (time, sequence, job, route or None for the arrival); the sequence is unique: the route is never compared.
    events: list[tuple[float, int, int, Route | None]] = []
    sequence = 0
    for job in world.jobs:
        events.append((job.arrival, sequence, job.index, None))
        sequence += 1
    heapq.heapify(events)

    def start(job: Job, now: float) -> None:
        nonlocal sequence
        result = results[job.index]
        route = policy.choose(job, now, frozenset(tried[job.index]), result.attempts + 1, result.spend_micros)
        if route is None:
            retry = policy.retry_after(job, now) if result.attempts == 0 else None
            if retry is not None:  # the client's create again, as an arrival
                heapq.heappush(events, (now + retry, sequence, job.index, None))
                sequence += 1
            return
        result.attempts += 1
        tried[job.index].add(route[0])
        heapq.heappush(events, (now + world.outcomes[job.index][route].seconds, sequence, job.index, route))
        sequence += 1

    while events:
        now, _, index, route = heapq.heappop(events)
        job = world.jobs[index]
        if route is None:
            start(job, now)
            continue
        attempt = world.outcomes[index][route]
        policy.observe(route, attempt, now, job)
        result = results[index]
        result.spend_micros += attempt.charge_micros
        if attempt.result == DELIVERED:
            result.delivered_by = route
            result.seconds = now - job.arrival
            # The job's own constraints (cost limit and budget too: the seed policy knew neither).
            result.slo_met = qualifies(job, world.offers[route]) and (
                job.deadline_seconds is None or result.seconds <= job.deadline_seconds
            )
        else:
            start(job, now)
    return results


@dataclass(frozen=True)
class Score:
    spend_micros: int
    oracle_micros: int
    cost_vs_oracle: float
    slo_attainment: float
    # The same ratio on the jobs the policy finished within their SLO alone: at least 1 by construction,
    # so that a policy cannot look cheap by missing jobs.
    cost_vs_oracle_on_met: float
    # Spend on jobs no backend could serve in hindsight (in neither denominator).
    spend_unservable_micros: int
    attempts_per_job: float


def score(world: World, results: list[JobResult], oracle: list[int | None] | None = None) -> Score:
    oracle = oracle_spend(world) if oracle is None else oracle
    servable = [index for index, spend in enumerate(oracle) if spend is not None]
    met = [index for index in servable if results[index].slo_met]
    spend = sum(results[index].spend_micros for index in servable)
    best = sum(oracle[index] or 0 for index in servable)
    met_best = sum(oracle[index] or 0 for index in met)
    return Score(
        spend,
        best,
        spend / best if best else math.nan,
        len(met) / len(servable) if servable else math.nan,
        sum(results[index].spend_micros for index in met) / met_best if met_best else math.nan,
        sum(result.spend_micros for index, result in enumerate(results) if oracle[index] is None),
        sum(result.attempts for result in results) / len(results) if results else 0.0,
    )


def replay(seed: int = SEED, jobs: int = JOBS) -> dict[str, float]:
    """The figures of `make bench`, and what explains them."""
    world = make_world(seed, jobs)
    oracle = oracle_spend(world)
    router = score(world, simulate(world, RouterPolicy(world.capabilities)), oracle)
    first = score(world, simulate(world, SeedPolicy(world.capabilities)), oracle)
    return {
        "cost_vs_oracle": round(router.cost_vs_oracle, 4),
        "slo_attainment": round(router.slo_attainment, 4),
        "seed_policy_cost_vs_oracle": round(first.cost_vs_oracle, 4),
        "seed_policy_slo_attainment": round(first.slo_attainment, 4),
        "cost_vs_oracle_on_slo_met": round(router.cost_vs_oracle_on_met, 4),
        "seed_policy_cost_vs_oracle_on_slo_met": round(first.cost_vs_oracle_on_met, 4),
        "replay_seed": seed,
        "replay_jobs": jobs,
        "replay_servable_jobs": sum(spend is not None for spend in oracle),
        "replay_oracle_usd": round(router.oracle_micros / MICROS, 2),
        "replay_router_usd": round(router.spend_micros / MICROS, 2),
        "replay_seed_policy_usd": round(first.spend_micros / MICROS, 2),
        "replay_router_attempts_per_job": round(router.attempts_per_job, 3),
    }


def decision_inputs(seed: int = SEED, jobs: int = 200) -> tuple[RouterPolicy, list[RouteRequest]]:
    """A router in steady state for timing its decisions: the four backends with their advertised
    capabilities, each provider's stats window full of drawn outcomes (the most work a decision does),
    and the first attempt's request of each of the world's jobs."""
    world = make_world(seed, jobs)
    policy = RouterPolicy(world.capabilities)
    for index, outcomes in enumerate(world.outcomes):
        for route, attempt in outcomes.items():
            if route[0] != LOCAL:
                policy.observe(route, attempt, float(index), world.jobs[index])
    requests = [route_request(job, job.deadline_seconds, frozenset(), 0) for job in world.jobs]
    return policy, requests


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(replay(int(sys.argv[1]) if len(sys.argv) > 1 else SEED)))
