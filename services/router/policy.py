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
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import NamedTuple, Protocol

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.breaker import CircuitBreaker
from aiprod_kit.capabilities import Offered, ShotShape, backend_name, offer_capabilities, offers
from aiprod_router.stats import BackendStats

# Below this observed success rate the expected cost stops growing: the breaker handles worse.
_MIN_SUCCESS_RATE = 0.25
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


def views_of(backends: Iterable[Known], video_seconds: float | None = None) -> list[BackendView]:
    """The views the policy ranks on, from what the router keeps of each backend; the p95 latency of
    clips of video_seconds when the backend rendered enough of them lately."""
    views = []
    for known in backends:
        stats = known.stats
        p95, p50 = stats.p95_p50_seconds(video_seconds)
        views.append(
            BackendView(
                known.backend,
                known.capabilities,
                known.serving,
                # Half-open: eligible for one trial render at a time.
                not known.breaker.trial_available(),
                p95,
                p50,
                stats.success_rate,
            )
        )
    return views


@dataclass(slots=True)
class Candidate:
    backend: int
    eligible: bool
    list_cost_micros: int = 0
    expected_cost_micros: int = 0
    quality: float = 0.0
    expected_seconds: float | None = None
    stand_in: bool = False
    # For an excluded candidate, the code of each reason (router_pb2.Exclusion), in the same order.
    exclusions: list[int] = field(default_factory=list)
    # The offer: the model and resolution at the backend ("" for a backend not reached yet).
    model: str = ""
    resolution: str = ""
    # Whether the backend offers several: then people are told which one.
    one_of_several: bool = False
    preferred: bool = False
    # Eligible only because nothing else is: its p95 is over the time left, its median within it.
    long_shot: bool = False
    # The reasons for people as (format, arguments): written out only when someone reads them (most
    # decisions are read for their order and codes alone).
    said: list[tuple[str, tuple]] = field(default_factory=list)
    _reasons: list[str] | None = None

    @property
    def reasons(self) -> list[str]:
        if self._reasons is None:
            self._reasons = [text.format(*arguments) for text, arguments in self.said]
        return self._reasons

    def say_first(self, text: str, *arguments: object) -> None:
        self.said.insert(0, (text, arguments))
        self._reasons = None

    @property
    def name(self) -> str:
        """The backend, and its offer when it has several ("runway gen4_turbo 720p")."""
        name = backend_name(self.backend)
        return f"{name} {self.model} {self.resolution}" if self.one_of_several else name


# The reason an eligible candidate is one, by whether its success rate and p95 are known.
_ELIGIBLE = {
    (False, False): "quality {:.2f}, expected cost {:.2f} USD",
    (True, False): "quality {:.2f}, expected cost {:.2f} USD ({:.0%} success)",
    (False, True): "quality {:.2f}, expected cost {:.2f} USD, p95 {:.0f} s",
    (True, True): "quality {:.2f}, expected cost {:.2f} USD ({:.0%} success), p95 {:.0f} s",
}


def _not_reached(view: BackendView) -> Candidate:
    return Candidate(
        view.backend,
        False,
        exclusions=[router_pb2.EXCLUSION_NOT_REACHED],
        said=[("renderer not reached yet", ())],
    )


def _assess(
    request: RouteRequest,
    view: BackendView,
    offered: Offered,
    providers_configured: bool,
    one_of_several: bool = False,
) -> Candidate:
    """One candidate: the backend with one of its offers. Each exclusion has a code, for programs (the
    gateway's budget policy, the final failure's reason), and a reason, for people. Run for every offer
    at every decision (17 µs a decision of seven offers, docs/performance.md): the request's fields are
    read once, and what depends only on the shot's shape comes from the offer's cache (`fit`)."""
    backend = view.backend
    quality = offered.nominal_quality
    floor = request.quality_floor
    fit = offered.fit(request.shot, request.shape)
    list_cost = fit.list_cost_micros
    success = view.success_rate
    expected_cost = round(list_cost / max(success, _MIN_SUCCESS_RATE)) if success is not None else list_cost
    stand_in = (
        quality < floor
        and backend == backend_pb2.BACKEND_LOCAL
        and (request.preferred_backend == backend_pb2.BACKEND_LOCAL or not providers_configured)
    )
    codes: list[int] = []
    said: list[tuple[str, tuple]] = []
    for mismatch in fit.mismatches:
        codes.append(router_pb2.EXCLUSION_UNSUPPORTED)
        said.append(("{}: {}", mismatch))
    if not view.serving:
        codes.append(router_pb2.EXCLUSION_NOT_SERVING)
        said.append(("renderer not serving", ()))
    if view.breaker_open:
        codes.append(router_pb2.EXCLUSION_BREAKER_OPEN)
        said.append(("breaker open after recent failures: cooling down", ()))
    if backend in request.tried:
        codes.append(router_pb2.EXCLUSION_ALREADY_TRIED)
        said.append(("already tried for this render", ()))
    if quality < floor and not stand_in:
        codes.append(router_pb2.EXCLUSION_UNDER_QUALITY_FLOOR)
        said.append(("quality {:.2f} under the floor {:.2f}", (quality, floor)))
    above = request.quality_above
    if above is not None and quality <= above:
        codes.append(router_pb2.EXCLUSION_UNDER_QUALITY_FLOOR)
        said.append(
            (
                "quality {:.2f} not above {:.2f}, the quality of the backend whose output earned the "
                "free re-render",
                (quality, above),
            )
        )
    max_cost = request.max_cost_micros
    if max_cost is not None and list_cost > max_cost:
        codes.append(router_pb2.EXCLUSION_OVER_MAX_COST)
        said.append(("cost {:.2f} USD over the job's limit {:.2f} USD", (list_cost / 1e6, max_cost / 1e6)))
    budget = request.budget_remaining_micros
    if budget is not None and list_cost > budget:
        codes.append(router_pb2.EXCLUSION_OVER_BUDGET)
        said.append(("cost {:.2f} USD over the budget left {:.2f} USD", (list_cost / 1e6, budget / 1e6)))
    p95 = view.p95_seconds
    seconds_left = request.seconds_left
    if seconds_left is not None and p95 is not None and p95 > seconds_left:
        codes.append(router_pb2.EXCLUSION_DEADLINE)
        said.append(("p95 {:.0f} s over the {:.0f} s left to the deadline", (p95, seconds_left)))
    preferred = backend == request.preferred_backend and request.preferred_model in ("", offered.model)
    if not codes:
        known = (success is not None, p95 is not None)
        arguments: tuple = (quality, expected_cost / 1e6)
        if known[0]:
            arguments += (success,)
        if known[1]:
            arguments += (p95,)
        said.append((_ELIGIBLE[known], arguments))
        if stand_in:
            said.append(("development stand-in, under the floor {:.2f}", (floor,)))
        if preferred:
            said.append(("preferred by the request", ()))
    return Candidate(
        backend,
        not codes,
        list_cost,
        expected_cost,
        quality,
        p95,
        stand_in,
        codes,
        offered.model,
        offered.resolution,
        one_of_several,
        preferred,
        False,  # a long shot: _admit_long_shots says so
        said,  # positional: a keyword costs a third of the construction
    )


# Each backend's offers as capabilities, by the capabilities message they come from (kept with it, so
# that its id is not reused): built once per message, not per decision (a renderer's capabilities
# change only when it turns SERVING again).
_OFFERED: dict[int, tuple[renderer_pb2.Capabilities, list[Offered]]] = {}
_OFFERED_KEPT = 64


def _offered(capabilities: renderer_pb2.Capabilities) -> list[Offered]:
    kept = _OFFERED.get(id(capabilities))
    if kept is not None and kept[0] is capabilities:
        return kept[1]
    offered = offers(capabilities)
    each = [
        Offered.of(capabilities if len(offered) == 1 else offer_capabilities(capabilities, offer))
        for offer in offered
    ]
    if len(_OFFERED) >= _OFFERED_KEPT:
        _OFFERED.clear()
    _OFFERED[id(capabilities)] = (capabilities, each)
    return each


def quality_first(request: RouteRequest) -> bool:
    return (
        not request.economy
        and request.quality_first_budget_micros is not None
        and request.budget_remaining_micros is not None
        and request.budget_remaining_micros >= request.quality_first_budget_micros
    )


def _order(by_quality: bool, candidate: Candidate) -> tuple:
    """The order to try candidates in: eligible first, then the preferred backend, the stand-in last,
    then the cheapest that meets the floor (then the best quality, then the fastest); by quality first
    with a large budget; a long shot (only long shots are eligible then) by its latency first."""
    latency = candidate.expected_seconds
    latency = _INFINITY if latency is None else latency
    cost, quality = candidate.expected_cost_micros, -candidate.quality
    first = not candidate.eligible
    preferred_first = not candidate.preferred
    if candidate.long_shot:
        return (first, preferred_first, candidate.stand_in, latency, cost, quality)
    if by_quality:
        return (first, preferred_first, candidate.stand_in, quality, cost, latency)
    return (first, preferred_first, candidate.stand_in, cost, quality, latency)


_INFINITY = float("inf")


def rank_backends(request: RouteRequest, views: list[BackendView]) -> list[Candidate]:
    """Every backend as a candidate, one for each of its offers (one for a backend not reached yet),
    eligible ones first in the order to try them. Plain loops: this runs at every decision, and a
    comprehension is a function call of its own (Python 3.11)."""
    providers_configured = False
    for view in views:
        if view.backend != backend_pb2.BACKEND_LOCAL:
            providers_configured = True
            break
    candidates: list[Candidate] = []
    for view in views:
        if view.capabilities is None:
            candidates.append(_not_reached(view))
            continue
        each = _offered(view.capabilities)
        several = len(each) > 1
        for offered in each:
            candidates.append(_assess(request, view, offered, providers_configured, several))
    by_quality = quality_first(request)
    order = partial(_order, by_quality)
    candidates.sort(key=order)
    if candidates and not candidates[0].eligible:
        _admit_long_shots(request, views, candidates)
        candidates.sort(key=order)
    if candidates and candidates[0].eligible:
        first = candidates[0]
        if first.long_shot:
            mode = "the likeliest to meet the deadline"
        else:
            mode = "best quality (large budget)" if by_quality else "cheapest that meets the floor"
        first.say_first("ranked first: {}", mode)
    return candidates


def _admit_long_shots(request: RouteRequest, views: list[BackendView], candidates: list[Candidate]) -> None:
    """When the deadline alone leaves every backend out, the ones whose median latency is within the time
    left may still make it: eligible after all (rather than a job given up that could have been on
    time), the likeliest first."""
    medians = {view.backend: view.p50_seconds for view in views}
    shots = [
        candidate
        for candidate in candidates
        if candidate.exclusions == [router_pb2.EXCLUSION_DEADLINE]
        and request.seconds_left is not None
        and (median := medians.get(candidate.backend)) is not None
        and median <= request.seconds_left
    ]
    for candidate in shots:
        median = medians[candidate.backend]
        candidate.eligible, candidate.long_shot = True, True
        candidate.expected_seconds = median
        candidate.exclusions = []
        (over, arguments), *_ = candidate.said
        candidate.said.clear()
        candidate.say_first(
            f"may miss the deadline: {over}, but its median {{:.0f}} s is within it", *arguments, median
        )


def describe(candidate: Candidate) -> str:
    return f"{candidate.name}: {'; '.join(candidate.reasons)}"
