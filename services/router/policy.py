"""The routing policy: which backends can take a render, and in what order. Pure: no I/O, no clock.

Candidates are filtered by capability (duration, aspect ratio, first frame, and the provider's limits
on prompt length and image size, so that a long prompt goes to a backend that takes it instead of
failing at one that does not), health, the router's own breaker, the quality floor, the job's cost
limit, the remaining budget and the deadline (observed p95 against the time left), each exclusion with
a code for programs and a reason for people, then ranked:

- by expected cost, retries included (list price over the observed success rate), with quality, then
  expected latency breaking ties: the cheapest render that meets the floor;
- by quality first when the remaining budget is large (at least `quality_first_budget_micros`, when
  configured), as the product's first version did: a large budget buys the best quality;
- a preferred backend goes first when it qualifies (its preferred model first, when one is named).

A backend offering several models and resolutions (Capabilities.offers) is one candidate per offer, each
with its own price, quality and limits: the cheapest offer that meets the floor wins, whichever
backend makes it. A backend already tried for the render is left out with all its offers.

A free re-render (an output under the tenant's service-level minimum) asks for a backend of better
nominal quality than the one that delivered it (`quality_above`): one of the same quality or worse is
excluded as under the floor.

The local renderer is a development stand-in: its nominal quality is under every preset's floor, so
it renders under the floor only when the request prefers it or when it is the only backend
configured (a mesh without providers), and says so.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter
from typing import NamedTuple, Protocol

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.breaker import BreakerState, CircuitBreaker
from aiprod_kit.capabilities import (
    SHAPES_KEPT,
    Offered,
    ShotFit,
    ShotShape,
    backend_name,
    offer_capabilities,
    offers,
)
from aiprod_router.stats import BackendStats

# Below this observed success rate the expected cost stops growing: the breaker handles worse.
_MIN_SUCCESS_RATE = 0.25
# A backend whose p95 takes more than this share of the time left to the deadline cuts it close: one
# render in twenty is slower than its p95, and some far slower (queued at the provider). It ranks after
# the eligible ones that leave a margin (the replay: one to two more jobs of 900 on time, for 0.4 to
# 1% more spend; docs/performance.md).
_CLOSE_TO_DEADLINE = 0.9
# The first version's threshold: from 35 USD left today, quality ranked first.
FIRST_VERSION_QUALITY_FIRST_MICROS = 35_000_000


@dataclass(frozen=True)
class RouteRequest:
    shot: render_pb2.Shot
    quality_floor: float = 0.0
    max_cost_micros: int | None = None
    # Seconds until the job's deadline; None without one.
    seconds_left: float | None = None
    preferred_backend: int = backend_pb2.BACKEND_UNSPECIFIED
    # With preferred_backend: the model preferred there; empty: any of its models.
    preferred_model: str = ""
    # What is left of the budget today; None when there is no cap.
    budget_remaining_micros: int | None = None
    # Economy mode (the ledger's 90% action): never quality first.
    economy: bool = False
    # Backends already tried for this render.
    tried: frozenset[int] = frozenset()
    # From this much budget left, quality ranks first; None: never (the cheapest that meets the floor).
    quality_first_budget_micros: int | None = None
    # A free re-render: only backends whose nominal quality is higher than this; None: any.
    quality_above: float | None = None

    @cached_property
    def shape(self) -> ShotShape:
        """The shot's fields that offers check, read once per request rather than once per offer."""
        return ShotShape.of(self.shot)


class BackendView(NamedTuple):
    """What the router knows of one backend (a tuple: one is built per backend at every decision)."""

    backend: int
    capabilities: renderer_pb2.Capabilities | None
    serving: bool
    breaker_open: bool = False
    p95_seconds: float | None = None
    p50_seconds: float | None = None
    success_rate: float | None = None


class Known(Protocol):
    """What the router keeps of a backend (aiprod_router.backends.Renderer; the replay's stand-in)."""

    backend: int
    capabilities: renderer_pb2.Capabilities | None
    serving: bool
    breaker: CircuitBreaker
    stats: BackendStats


# A named tuple made by tuple.__new__ directly: its own __new__ is a Python function taking keywords, a
# third of a decision's views (docs/performance.md, route_decision).
_new_tuple = tuple.__new__
_CLOSED = BreakerState.CLOSED


def views_of(backends: Iterable[Known], video_seconds: float | None = None) -> list[BackendView]:
    """The views the policy ranks on, from what the router keeps of each backend; the p95 latency of
    clips of video_seconds when the backend rendered enough of them lately.

    A backend's view is kept with its stats until their next outcome, and used again while its health,
    capabilities and breaker still read the same (half-open is a matter of time: a breaker that is not
    closed is asked at every decision); a decision built every view anew before (a fifth of its time,
    docs/performance.md, route_decision)."""
    views = []
    for known in backends:
        stats = known.stats
        breaker = known.breaker
        breaker_open = breaker.state is not _CLOSED and not breaker.trial_available()
        view = stats.views.get(video_seconds)
        if (
            view is None
            or view.breaker_open is not breaker_open
            or view.serving is not known.serving
            or view.capabilities is not known.capabilities
        ):
            p95, p50 = stats.p95_p50_seconds(video_seconds)
            # In BackendView's order: backend, capabilities, serving, breaker_open (half-open: eligible
            # for one trial render at a time), p95_seconds, p50_seconds, success_rate.
            fields = (
                known.backend,
                known.capabilities,
                known.serving,
                breaker_open,
                p95,
                p50,
                stats.success_rate,
            )
            view = stats.views[video_seconds] = _new_tuple(BackendView, fields)
        views.append(view)
    return views


# Why a candidate is out, as bits of Candidate.out; its exclusions and reasons are told in this order.
_UNSUPPORTED = 1  # one exclusion for each of the shot's mismatches with the offer
_NOT_SERVING = 1 << 1
_BREAKER_OPEN = 1 << 2
_TRIED = 1 << 3
_UNDER_FLOOR = 1 << 4
_NOT_ABOVE = 1 << 5
_OVER_MAX_COST = 1 << 6
_OVER_BUDGET = 1 << 7
_LATE = 1 << 8
_NOT_REACHED = 1 << 9
_CODES = (
    (_NOT_SERVING, router_pb2.EXCLUSION_NOT_SERVING),
    (_BREAKER_OPEN, router_pb2.EXCLUSION_BREAKER_OPEN),
    (_TRIED, router_pb2.EXCLUSION_ALREADY_TRIED),
    (_UNDER_FLOOR, router_pb2.EXCLUSION_UNDER_QUALITY_FLOOR),
    (_NOT_ABOVE, router_pb2.EXCLUSION_UNDER_QUALITY_FLOOR),
    (_OVER_MAX_COST, router_pb2.EXCLUSION_OVER_MAX_COST),
    (_OVER_BUDGET, router_pb2.EXCLUSION_OVER_BUDGET),
    (_LATE, router_pb2.EXCLUSION_DEADLINE),
    (_NOT_REACHED, router_pb2.EXCLUSION_NOT_REACHED),
)


class Candidate(NamedTuple):
    """One backend with one of its offers, as the policy assessed it: the facts it is ranked on, with
    its exclusions (for programs) and reasons (for people) told from them when someone reads them (most
    decisions are read for their order alone). A tuple built in C: seven are built at every decision."""

    backend: int
    eligible: bool
    list_cost_micros: int
    expected_cost_micros: int
    quality: float
    expected_seconds: float | None
    stand_in: bool
    # The offer: the model and resolution at the backend ("" for a backend not reached yet).
    model: str
    resolution: str
    # Whether the backend offers several: then people are told which one.
    one_of_several: bool
    preferred: bool
    # Eligible only because nothing else is: its p95 is over the time left, its median within it.
    long_shot: bool
    # Where it goes in the order to try candidates in: _rank_key.
    rank_key: tuple
    # Why it is out (_UNSUPPORTED...), 0 when eligible; and what the reasons are told from.
    out: int
    mismatches: tuple[tuple[str, str], ...]
    request: RouteRequest
    view: BackendView
    # How the first candidate was ranked first ("" for the others). Last: rank_backends sets it.
    ranked_first: str

    @property
    def exclusions(self) -> list[int]:
        """The code of each reason it is out (router_pb2.Exclusion), in the order of its reasons."""
        out = self.out
        codes = [router_pb2.EXCLUSION_UNSUPPORTED] * len(self.mismatches) if out & _UNSUPPORTED else []
        for bit, code in _CODES:
            if out & bit:
                codes.append(code)
        return codes

    @property
    def reasons(self) -> list[str]:
        return [text.format(*arguments) for text, arguments in _said(self)]

    @property
    def name(self) -> str:
        """The backend, and its offer when it has several ("runway gen4_turbo 720p")."""
        name = backend_name(self.backend)
        return f"{name} {self.model} {self.resolution}" if self.one_of_several else name


def _said(candidate: Candidate) -> list[tuple[str, tuple]]:
    """A candidate's reasons as (format, arguments)."""
    said: list[tuple[str, tuple]] = []
    if candidate.ranked_first:
        said.append(("ranked first: {}", (candidate.ranked_first,)))
    request, view, out, quality = candidate.request, candidate.view, candidate.out, candidate.quality
    p95, seconds_left = view.p95_seconds, request.seconds_left
    if candidate.long_shot:
        said.append((_LONG_SHOT, (p95, seconds_left, candidate.expected_seconds)))
        return said
    if candidate.eligible:
        arguments: tuple = (quality, candidate.expected_cost_micros / 1e6)
        if view.success_rate is not None:
            arguments += (view.success_rate,)
        if p95 is not None:
            arguments += (p95,)
        said.append((_ELIGIBLE[view.success_rate is not None, p95 is not None], arguments))
        if candidate.stand_in:
            said.append(("development stand-in, under the floor {:.2f}", (request.quality_floor,)))
        if candidate.preferred:
            # The gateway prefers a quoted route as a request naming a backend does.
            said.append(("preferred by the request or its quote", ()))
        if seconds_left is not None and p95 is not None and p95 > seconds_left * _CLOSE_TO_DEADLINE:
            said.append(("p95 {:.0f} s close to the {:.0f} s left to the deadline", (p95, seconds_left)))
        return said
    if out & _UNSUPPORTED:
        for mismatch in candidate.mismatches:
            said.append(("{}: {}", mismatch))
    if out & _NOT_SERVING:
        said.append(("renderer not serving", ()))
    if out & _BREAKER_OPEN:
        said.append(("breaker open after recent failures: cooling down", ()))
    if out & _TRIED:
        said.append(("already tried for this render", ()))
    if out & _UNDER_FLOOR:
        said.append(("quality {:.2f} under the floor {:.2f}", (quality, request.quality_floor)))
    if out & _NOT_ABOVE:
        said.append(
            (
                "quality {:.2f} not above {:.2f}, the quality of the backend whose output earned the "
                "free re-render",
                (quality, request.quality_above),
            )
        )
    list_usd = candidate.list_cost_micros / 1e6
    if out & _OVER_MAX_COST:
        limit = request.max_cost_micros or 0
        said.append(("cost {:.2f} USD over the job's limit {:.2f} USD", (list_usd, limit / 1e6)))
    if out & _OVER_BUDGET:
        budget = request.budget_remaining_micros or 0
        said.append(("cost {:.2f} USD over the budget left {:.2f} USD", (list_usd, budget / 1e6)))
    if out & _LATE:
        said.append((_LATE_REASON, (p95, seconds_left)))
    if out & _NOT_REACHED:
        said.append(("renderer not reached yet", ()))
    return said


# The reason an eligible candidate is one, by whether its success rate and p95 are known.
_ELIGIBLE = {
    (False, False): "quality {:.2f}, expected cost {:.2f} USD",
    (True, False): "quality {:.2f}, expected cost {:.2f} USD ({:.0%} success)",
    (False, True): "quality {:.2f}, expected cost {:.2f} USD, p95 {:.0f} s",
    (True, True): "quality {:.2f}, expected cost {:.2f} USD ({:.0%} success), p95 {:.0f} s",
}
_LATE_REASON = "p95 {:.0f} s over the {:.0f} s left to the deadline"
_LONG_SHOT = f"may miss the deadline: {_LATE_REASON}, but its median {{:.0f}} s is within it"


def _not_reached(request: RouteRequest, view: BackendView, by_quality: bool) -> Candidate:
    return Candidate(
        backend=view.backend,
        eligible=False,
        list_cost_micros=0,
        expected_cost_micros=0,
        quality=0.0,
        expected_seconds=None,
        stand_in=False,
        model="",
        resolution="",
        one_of_several=False,
        preferred=False,
        long_shot=False,
        rank_key=_rank_key(by_quality, False, False, False, False, 0, 0.0, _INFINITY),
        out=_NOT_REACHED,
        mismatches=(),
        request=request,
        view=view,
        ranked_first="",
    )


def _assess(
    request: RouteRequest,
    view: BackendView,
    fitted: list[tuple[Offered, ShotFit]],
    providers_configured: bool,
    by_quality: bool,
    candidates: list[Candidate],
) -> None:
    """Each of the backend's offers (fitted: with the shot's fit to it) as a candidate, appended to
    candidates. Run at every decision (13 µs a decision of seven offers, docs/performance.md): what
    depends on the backend alone is worked out once for its offers, what depends on the shot's shape
    alone comes from the offer's cache (`fit`), and reasons are told only when read."""
    backend = view.backend
    floor = request.quality_floor
    success = view.success_rate
    retried = None if success is None else (success if success > _MIN_SUCCESS_RATE else _MIN_SUCCESS_RATE)
    p95 = view.p95_seconds
    latency = _INFINITY if p95 is None else p95
    seconds_left = request.seconds_left
    # What the backend itself is out for, whichever the offer.
    down = 0
    if not view.serving:
        down |= _NOT_SERVING
    if view.breaker_open:
        down |= _BREAKER_OPEN
    if backend in request.tried:
        down |= _TRIED
    close = False
    if seconds_left is not None and p95 is not None:
        if p95 > seconds_left:
            down |= _LATE
        close = p95 > seconds_left * _CLOSE_TO_DEADLINE
    may_stand_in = backend == backend_pb2.BACKEND_LOCAL and (
        request.preferred_backend == backend_pb2.BACKEND_LOCAL or not providers_configured
    )
    preferred_backend = backend == request.preferred_backend
    preferred_model = request.preferred_model
    above = request.quality_above
    max_cost = request.max_cost_micros
    budget = request.budget_remaining_micros
    several = len(fitted) > 1
    for offered, fit in fitted:
        quality = offered.nominal_quality
        list_cost = fit.list_cost_micros
        expected_cost = list_cost if retried is None else round(list_cost / retried)
        stand_in = quality < floor and may_stand_in
        out = _UNSUPPORTED | down if fit.mismatches else down
        if quality < floor and not stand_in:
            out |= _UNDER_FLOOR
        if above is not None and quality <= above:
            out |= _NOT_ABOVE
        if max_cost is not None and list_cost > max_cost:
            out |= _OVER_MAX_COST
        if budget is not None and list_cost > budget:
            out |= _OVER_BUDGET
        preferred = preferred_backend and preferred_model in ("", offered.model)
        eligible = not out
        key = _rank_key(by_quality, eligible, preferred, stand_in, close, expected_cost, quality, latency)
        # In Candidate's order, built as a plain tuple (_new_tuple): backend, eligible,
        # list_cost_micros, expected_cost_micros, quality, expected_seconds, stand_in, model,
        # resolution, one_of_several, preferred, long_shot (_admit_long_shots says so), rank_key, out,
        # mismatches, request, view, ranked_first.
        fields = (
            backend,
            eligible,
            list_cost,
            expected_cost,
            quality,
            p95,
            stand_in,
            offered.model,
            offered.resolution,
            several,
            preferred,
            False,
            key,
            out,
            fit.mismatches,
            request,
            view,
            "",
        )
        candidates.append(_new_tuple(Candidate, fields))


class _Offers(NamedTuple):
    capabilities: renderer_pb2.Capabilities
    # Each offer as capabilities of its own (the backend's own when it has one).
    each: list[Offered]
    # Whether an offer limits the prompt's length or the image's size: then a shot's lengths matter.
    sized: bool
    # The offers with a shot's fit to each, by the shot's shape (shots repeat their shapes).
    fitted: dict[tuple, list[tuple[Offered, ShotFit]]]


# Each backend's offers by the capabilities message they come from (kept with it, so that its id is not
# reused): built once per message, not per decision (a renderer's capabilities change only when it
# turns SERVING again).
_OFFERS: dict[int, _Offers] = {}
_OFFERS_KEPT = 64


def _fitted(capabilities: renderer_pb2.Capabilities, request: RouteRequest) -> list[tuple[Offered, ShotFit]]:
    """The backend's offers, each with the request's shot's fit to it."""
    kept = _OFFERS.get(id(capabilities))
    if kept is None or kept.capabilities is not capabilities:
        offered = offers(capabilities)
        each = [
            Offered.of(capabilities if len(offered) == 1 else offer_capabilities(capabilities, offer))
            for offer in offered
        ]
        if len(_OFFERS) >= _OFFERS_KEPT:
            _OFFERS.clear()
        kept = _OFFERS[id(capabilities)] = _Offers(capabilities, each, any(o.sized for o in each), {})
    shape = request.shape
    # Keyed as Offered.fit keys an offer's answers: by the lengths only where an offer limits them.
    key = shape.sized if kept.sized else shape.unsized
    fitted = kept.fitted.get(key)
    if fitted is None:
        if len(kept.fitted) >= SHAPES_KEPT:
            kept.fitted.clear()
        fitted = kept.fitted[key] = [(offered, offered.fit(request.shot, shape)) for offered in kept.each]
    return fitted


def quality_first(request: RouteRequest) -> bool:
    return (
        not request.economy
        and request.quality_first_budget_micros is not None
        and request.budget_remaining_micros is not None
        and request.budget_remaining_micros >= request.quality_first_budget_micros
    )


def _rank_key(
    by_quality: bool,
    eligible: bool,
    preferred: bool,
    stand_in: bool,
    close: bool,
    cost_micros: int,
    quality: float,
    latency: float,
    long_shot: bool = False,
) -> tuple:
    """The order to try candidates in: eligible first, then the preferred backend, the stand-in last,
    then those that leave a margin to the deadline (not `close`), then the cheapest that meets the
    floor (then the best quality, then the fastest); by quality first with a large budget; a long shot
    (only long shots are eligible then) by its latency first."""
    if long_shot:
        return (not eligible, not preferred, stand_in, latency, cost_micros, -quality)
    if by_quality:
        return (not eligible, not preferred, stand_in, close, -quality, cost_micros, latency)
    return (not eligible, not preferred, stand_in, close, cost_micros, -quality, latency)


_INFINITY = float("inf")
_BY_RANK = attrgetter("rank_key")


def rank_backends(request: RouteRequest, views: list[BackendView]) -> list[Candidate]:
    """Every backend as a candidate, one for each of its offers (one for a backend not reached yet),
    eligible ones first in the order to try them. Plain loops: this runs at every decision, and a
    comprehension is a function call of its own (Python 3.11)."""
    providers_configured = False
    for view in views:
        if view.backend != backend_pb2.BACKEND_LOCAL:
            providers_configured = True
            break
    by_quality = quality_first(request)
    candidates: list[Candidate] = []
    for view in views:
        if view.capabilities is None:
            candidates.append(_not_reached(request, view, by_quality))
        else:
            _assess(
                request,
                view,
                _fitted(view.capabilities, request),
                providers_configured,
                by_quality,
                candidates,
            )
    candidates.sort(key=_BY_RANK)
    if (
        candidates
        and not candidates[0].eligible
        and _admit_long_shots(request, views, candidates, by_quality)
    ):
        candidates.sort(key=_BY_RANK)
    if candidates and candidates[0].eligible:
        first = candidates[0]
        if first.long_shot:
            mode = "the likeliest to meet the deadline"
        else:
            mode = "best quality (large budget)" if by_quality else "cheapest that meets the floor"
        candidates[0] = _new_tuple(Candidate, (*first[:-1], mode))  # ranked_first, the last field
    return candidates


def _admit_long_shots(
    request: RouteRequest, views: list[BackendView], candidates: list[Candidate], by_quality: bool
) -> bool:
    """When the deadline alone leaves every backend out, the ones whose median latency is within the time
    left may still make it: eligible after all (rather than a job given up that could have been on
    time), the likeliest first. Whether any was."""
    seconds_left = request.seconds_left
    if seconds_left is None:
        return False
    medians = {view.backend: view.p50_seconds for view in views}
    admitted = False
    for index, candidate in enumerate(candidates):
        median = medians.get(candidate.backend)
        if candidate.out != _LATE or median is None or median > seconds_left:
            continue
        key = _rank_key(
            by_quality,
            True,
            candidate.preferred,
            candidate.stand_in,
            True,
            candidate.expected_cost_micros,
            candidate.quality,
            median,
            long_shot=True,
        )
        candidates[index] = candidate._replace(
            eligible=True, expected_seconds=median, long_shot=True, rank_key=key, out=0
        )
        admitted = True
    return admitted


def describe(candidate: Candidate) -> str:
    return f"{candidate.name}: {'; '.join(candidate.reasons)}"
