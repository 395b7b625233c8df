"""The routing replay of `make bench` (bench/replay.py): its oracle on a case checked by hand, its
determinism, and the bound the oracle is: no policy finishes a job within its SLO for less."""

import dataclasses
import importlib
import sys
from pathlib import Path

import pytest

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.money import usd_from_units

# bench/ is a directory of the repository, not an installed package.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
replay = importlib.import_module("bench.replay")

A, B, C = replay.RUNWAY, replay.VEO, replay.REPLICATE
# Each backend's one offer: its default model ("" here) at 720p.
RA, RB, RC = ((backend, "", "720p") for backend in (A, B, C))
OK, FAILED, REJECTED = replay.DELIVERED, replay.FAILED, replay.REJECTED


def capabilities(backend: int, usd_per_second: float, quality: float) -> renderer_pb2.Capabilities:
    return renderer_pb2.Capabilities(
        backend=backend,
        min_duration_seconds=2,
        max_duration_seconds=10,
        aspect_ratios=[render_pb2.ASPECT_RATIO_16_9],
        price_per_second=usd_from_units(usd_per_second),
        nominal_quality=quality,
    )


def job(index: int, floor: float, deadline: float | None, max_cost_usd: float | None = None):
    return replay.Job(
        index,
        arrival=1000.0 * index,
        preset="quick_social",
        shot=render_pb2.Shot(prompt="a harbour at dawn", duration_seconds=10),
        quality_floor=floor,
        max_cost_micros=None if max_cost_usd is None else round(max_cost_usd * 1e6),
        deadline_seconds=deadline,
        budget_remaining_micros=None,
    )


def attempt(result: str, seconds: float, billed_usd: float, quality: float | None = None):
    return replay.Attempt(result, seconds, round(billed_usd * 1e6), quality)


def hand_world():
    """Three backends, 10 s clips: A 0.10 USD/s q 0.95 (1.00 a clip), B 0.05 q 0.80 (0.50), C 0.02 q 0.60
    (0.20). Failed tasks bill nothing, delivered ones (QC rejected too) their list price.

    - job 0, floor 0.6, deadline 100 s: A delivers in 50 s, B fails, C delivers in 150 s (late).
      Oracle: A, 1.00 (C is cheaper but late, B failed).
    - job 1, floor 0.7, no deadline, cost limit 0.60: all deliver. A is over the limit, C under the
      floor: oracle B, 0.50.
    - job 2, floor 0.9, no deadline: A's output is rejected by QC (billed 1.00), B and C are under the
      floor: no backend serves it, in neither denominator.
    Oracle total: 1.00 + 0.50 = 1.50 USD.
    """
    return replay.World(
        jobs=(job(0, 0.6, 100.0), job(1, 0.7, None, max_cost_usd=0.60), job(2, 0.9, None)),
        capabilities={A: capabilities(A, 0.10, 0.95), B: capabilities(B, 0.05, 0.80), C: capabilities(C, 0.02, 0.60)},
        outcomes=(
            {RA: attempt(OK, 50, 1.00, 0.95), RB: attempt(FAILED, 20, 0), RC: attempt(OK, 150, 0.20, 0.6)},
            {RA: attempt(OK, 50, 1.00, 0.95), RB: attempt(OK, 80, 0.50, 0.8), RC: attempt(OK, 90, 0.20, 0.6)},
            {RA: attempt(REJECTED, 60, 1.00, 0.3), RB: attempt(OK, 80, 0.50, 0.8), RC: attempt(OK, 90, 0.20, 0.6)},
        ),
    )  # fmt: skip


def test_the_oracle_is_the_cheapest_qualifying_delivery_in_hindsight():
    assert replay.oracle_spend(hand_world()) == [1_000_000, 500_000, None]


def test_the_router_on_the_hand_case_pays_per_attempt_and_may_spend_under_the_oracle_by_missing():
    """The router knows nothing yet (no stats: no p95), so:
    - job 0: C, the cheapest that meets the floor, delivers 150 s late: 0.20 paid, SLO missed;
    - job 1: B (A over the cost limit, C under the floor): 0.50, met;
    - job 2: A alone qualifies; its output is rejected (1.00 paid), nothing else qualifies: not served.
    Over the servable jobs: 0.70 against the oracle's 1.50, one of two met; on the met job alone, 0.50
    against 0.50. Job 2's 1.00 is spend on an unservable job."""
    world = hand_world()
    results = replay.simulate(world, replay.RouterPolicy(world.capabilities))
    assert [(r.spend_micros, r.attempts, r.delivered_by, r.slo_met) for r in results] == [
        (200_000, 1, RC, False),
        (500_000, 1, RB, True),
        (1_000_000, 1, None, False),
    ]
    score = replay.score(world, results)
    assert (score.spend_micros, score.oracle_micros, score.spend_unservable_micros) == (
        700_000,
        1_500_000,
        1_000_000,
    )
    assert score.cost_vs_oracle == pytest.approx(0.7 / 1.5)
    assert score.slo_attainment == 0.5
    assert score.cost_vs_oracle_on_met == 1.0


def offer(model: str, usd_per_second: float, quality: float) -> renderer_pb2.ModelOffer:
    return renderer_pb2.ModelOffer(
        model=model,
        resolution="720p",
        min_duration_seconds=2,
        max_duration_seconds=10,
        aspect_ratios=[render_pb2.ASPECT_RATIO_16_9],
        price_per_second=usd_from_units(usd_per_second),
        nominal_quality=quality,
    )


def test_the_oracle_and_the_router_choose_among_a_backends_models():
    """A offers "best" (0.10 USD/s, q 0.95) and "fast" (0.03, q 0.85), B one model (0.05, q 0.80); 10 s
    clips, every one delivered.
    - job 0, floor 0.8: A's fast model, 0.30, is the cheapest that qualifies (B 0.50 is dearer);
    - job 1, floor 0.9: only A's best model qualifies: 1.00.
    """
    several = capabilities(A, 0.10, 0.95)
    several.offers.extend([offer("best", 0.10, 0.95), offer("fast", 0.03, 0.85)])
    best, fast = (A, "best", "720p"), (A, "fast", "720p")
    outcomes = {
        best: attempt(OK, 50, 1.00, 0.95),
        fast: attempt(OK, 40, 0.30, 0.85),
        RB: attempt(OK, 60, 0.50, 0.8),
    }
    world = replay.World(
        jobs=(job(0, 0.8, None), job(1, 0.9, None)),
        capabilities={A: several, B: capabilities(B, 0.05, 0.80)},
        outcomes=(outcomes, dict(outcomes)),
    )
    assert replay.oracle_spend(world) == [300_000, 1_000_000]
    results = replay.simulate(world, replay.RouterPolicy(world.capabilities))
    assert [(r.delivered_by, r.spend_micros, r.slo_met) for r in results] == [
        (fast, 300_000, True),
        (best, 1_000_000, True),
    ]
    assert replay.score(world, results).cost_vs_oracle == 1.0


def test_the_replay_is_deterministic_for_a_seed():
    first, again = replay.make_world(7, 200), replay.make_world(7, 200)
    assert first == again
    assert replay.replay(7, 200) == replay.replay(7, 200)
    assert replay.make_world(8, 200) != first


@pytest.mark.parametrize("seed", [1, 2, 3, 12])
def test_no_policy_finishes_a_job_within_its_slo_for_less_than_the_oracle(seed):
    world = replay.make_world(seed, 300)
    oracle = replay.oracle_spend(world)
    for policy in (replay.RouterPolicy(world.capabilities), replay.SeedPolicy(world.capabilities)):
        results = replay.simulate(world, policy)
        met = [index for index, result in enumerate(results) if result.slo_met]
        assert met, policy.name
        for index in met:
            # A job finished within its SLO had a qualifying delivery: the oracle has one too.
            assert oracle[index] is not None
            assert results[index].spend_micros >= oracle[index], (policy.name, index)
        assert replay.score(world, results, oracle).cost_vs_oracle_on_met >= 1.0


def test_a_job_refused_while_its_only_backend_cools_down_is_asked_again_as_its_client_is_told():
    """The gateway refuses a create that only a backend down or cooling down keeps out UNAVAILABLE,
    with a RetryInfo of BACKENDS_RETRY_SECONDS; the replay's client asks again then, while its deadline
    allows. A's breaker opens at t=990 (30 s cooldown): job 1 (t=1000, deadline 300 s) is asked again
    every 5 s, taken by A's half-open trial at t=1020 and delivered 50 s later, within its SLO; job 2
    (t=2000, 15 s deadline) finds A's breaker open again and is given up once its deadline cannot be met."""
    capable = {A: capabilities(A, 0.10, 0.95)}
    delivers = ({RA: attempt(OK, 50, 1.00, 0.95)},)
    policy = replay.RouterPolicy(capable)
    breaker = policy.renderers[0].breaker

    def trip(at: float) -> None:
        policy.now = at
        while breaker.allow_request():
            breaker.record_failure()

    def alone(index: int, deadline: float) -> list:
        """Job `index` (arriving at 1000 * index s) in a world of its own, after the jobs before it."""
        only = dataclasses.replace(job(index, 0.6, deadline), index=0)
        return replay.simulate(replay.World((only,), capable, delivers), policy)

    trip(990.0)
    assert [(r.attempts, r.delivered_by, r.seconds, r.slo_met) for r in alone(1, 300.0)] == [
        (1, RA, 70.0, True)
    ]
    trip(1990.0)
    assert [(r.attempts, r.delivered_by, r.slo_met) for r in alone(2, 15.0)] == [(0, None, False)]
