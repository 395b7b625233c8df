"""The default plan of a long video: its duration cut into shots that backends render in one call each.

Providers render 2 to 10 s a call and a job may ask for up to 180 s, so a job's plan (RenderPlan) is a
list of shots, each rendered by one backend call, then stitched in order. The planner is deterministic
(the same duration and backends give the same shots, whatever the order the backends are listed in), so
that a user can predict a plan from these rules.

`cut(duration, clips)`, where each clip is what one qualifying backend renders in one call (ClipLimits,
judged as the router judges a shot: `aiprod_kit.capabilities.shot_mismatches`):

1. One shot of exactly `duration` when some backend renders it whole.
2. Otherwise the shots take their lengths from one family of backends, so that a shot can fall back to
   another backend of the family. The candidate lengths are every allowed duration of every backend and
   the longest of each backend that takes any duration in a range; the candidate the most backends
   accept wins, ties going to the longer. The family is the backends that accept it, and the shots take
   only lengths every one of them accepts: the allowed durations they have in common, or, when every
   backend of the family takes a range, any length in the range they have in common. (That set always
   holds the winning length, which is its longest.)
3. From those lengths the cuts are, for a range, equal shots (n shots of duration / n, or of the range's
   bound nearest it); for a set of exact durations, at most two adjacent lengths a > b of the set, k
   shots of a and the rest of b. The plan is the cut whose total is the closest to `duration`; then the
   one with the fewest shots; then the evenest (the smallest a - b, one length only best); then the
   longest (as close, a video is made longer rather than shorter).
4. Its total must be within TOLERANCE_SECONDS of `duration`. When it is not, the next family in rule 2's
   order is tried (each set of backends once); when none comes within it, PlanningError names the closest
   cut found. The shots are listed longest first, and each is accepted by every backend of its family.

For instance: Veo (4, 6 or 8 s): 30 s is 8 + 8 + 8 + 6; 31 s is 4 x 8 = 32 s (30 s is as close, but
uneven); 3 s is one shot of 4 s; 180 s is 21 x 8 + 2 x 6. MiniMax (6 s only): 31 s is 5 x 6 = 30 s, 33 s
is a PlanningError (30 s and 36 s are both 3 s off). The local renderer (any length from 1 to 60 s):
120 s is 60 + 60, 150 s is 3 x 50. Runway (2 to 10 s) with Veo and the local renderer: 120 s is 15 x 8
(8 s is the longest length all three accept). Veo with MiniMax: 30 s is 5 x 6 (6 s is the only length
both accept), but 16 s is 8 + 8 (no cut of 6 s shots comes within 1 s of 16, so Veo's own lengths are
used).

`plan_shots(spec, clips)`, the plan of a spec:

- the caller's own shots (`spec.shots`) are kept as they are, not cut again: their prompts stripped, an
  unset aspect ratio taken from the spec, an unset seed derived as below, and the spec's reference images
  given to a shot that has none of its own;
- otherwise one shot is exactly the plan the gateway has always made (`validation.plan_of`), with the
  cut's duration (the spec's own, unless no backend renders it whole);
- several shots: shot i (from 0) of n shows "<prompt> (shot i+1 of n)", in the spec's aspect ratio, with
  the seed spec.seed + i (modulo 2**64), or 0 for every shot when the spec's seed is 0 (each renderer
  then derives a seed from the shot's prompt, which differs from shot to shot). Only the first shot
  starts from the spec's first frame. No shot is marked `continuous`: the shots of a default plan render
  side by side; a caller or a reviewer marks the shots that must follow on from the one before.

Every shot a plan makes (one or several) carries the spec's reference images: they are what keeps a
character or a product the same from shot to shot.
"""

import bisect
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_gateway import validation
from aiprod_kit.capabilities import _DURATION_EPSILON, backend_name

# The plan's total is the closest the clip lengths can make, never further than this from the request.
TOLERANCE_SECONDS = 1.0
# Errors closer than this are equal: sums of lengths carry floating-point noise.
_NOISE = 1e-9
_SEED_MODULUS = 2**64


class PlanningError(Exception):
    """No cut of the duration comes within TOLERANCE_SECONDS (the message says why, with the figures)."""


@dataclass(frozen=True)
class ClipLimits:
    """What one qualifying backend renders in one call."""

    backend: int  # aiprod.common.v1.Backend enum value
    min_seconds: float
    max_seconds: float
    # The exact durations it accepts; empty: any in [min_seconds, max_seconds].
    allowed: tuple[float, ...] = ()

    @classmethod
    def of(cls, capabilities: renderer_pb2.Capabilities) -> "ClipLimits":
        return cls(
            backend=capabilities.backend,
            min_seconds=capabilities.min_duration_seconds,
            max_seconds=capabilities.max_duration_seconds,
            allowed=tuple(capabilities.allowed_durations_seconds),
        )

    def accepts(self, seconds: float) -> bool:
        """Whether one call renders `seconds`, exactly as `shot_mismatches` judges a shot's duration (with
        its tolerance on exact durations), so that the router takes every shot the planner makes."""
        if not self.min_seconds <= seconds <= self.max_seconds:
            return False
        return not self.allowed or any(abs(seconds - allowed) < _DURATION_EPSILON for allowed in self.allowed)


@dataclass(frozen=True)
class _Lengths:
    """The shot lengths a family of backends has in common: `exact` ones, or else any in [low, high]."""

    exact: tuple[float, ...]  # ascending; empty for a range
    low: float
    high: float

    def __str__(self) -> str:
        if not self.exact:
            return f"any length from {self.low:g} to {self.high:g} s"
        return f"{', '.join(f'{length:g}' for length in self.exact)} s"


@dataclass(frozen=True)
class _Cut:
    shots: tuple[float, ...]  # longest first
    total: float
    error: float
    spread: float  # longest shot minus shortest

    def rank(self) -> tuple[float, int, float, float]:
        # Rule 3's order: closest, fewest shots, evenest, longest.
        return (round(self.error, 9), len(self.shots), round(self.spread, 9), -round(self.total, 9))

    def __str__(self) -> str:
        counts = {length: self.shots.count(length) for length in self.shots}
        parts = " + ".join(f"{count} x {length:g} s" for length, count in counts.items())
        return f"{parts} = {self.total:g} s"


def cut(duration: float, clips: Sequence[ClipLimits]) -> list[float]:
    """The shot durations for `duration` seconds, longest first (rules in the module's docstring)."""
    if not clips:
        raise PlanningError(f"no backend to render {duration:g} s: cannot cut it into shots")
    if not math.isfinite(duration) or duration <= 0:
        raise PlanningError(f"cannot cut {duration:g} s: a duration must be positive")
    if any(clip.accepts(duration) for clip in clips):
        return [duration]
    closest: tuple[_Cut, _Lengths, tuple[ClipLimits, ...]] | None = None
    for family in _families(tuple(clips)):
        lengths = _common_lengths(family)
        best = _closest_cut(duration, lengths)
        if best.error <= TOLERANCE_SECONDS + _NOISE:
            return list(best.shots)
        if closest is None or best.rank() < closest[0].rank():
            closest = (best, lengths, family)
    if closest is None:
        renders = ", ".join(_limits(clip) for clip in clips)
        raise PlanningError(f"cannot cut {duration:g} s: no backend renders any length ({renders})")
    best, lengths, family = closest
    backends = ", ".join(sorted({backend_name(clip.backend) for clip in family}))
    raise PlanningError(
        f"no cut of {duration:g} s comes within {TOLERANCE_SECONDS:g} s: the closest, {best}, is "
        f"{best.error:g} s off (shots of {lengths}, from {backends})"
    )


def plan_shots(spec: render_pb2.RenderSpec, clips: Sequence[ClipLimits]) -> render_pb2.RenderPlan:
    """The default plan of a spec (rules in the module's docstring)."""
    if spec.shots:
        plan = render_pb2.RenderPlan()
        for index, given in enumerate(spec.shots):
            shot = plan.shots.add()
            shot.CopyFrom(given)
            shot.prompt = given.prompt.strip()
            shot.aspect_ratio = given.aspect_ratio or spec.aspect_ratio
            shot.resolution = given.resolution or spec.resolution
            shot.seed = given.seed or shot_seed(spec.seed, index)
        return plan
    durations = cut(spec.duration_seconds, clips)
    if len(durations) == 1:
        # The one-shot plan jobs have always had, so that existing jobs are planned as before.
        plan = validation.plan_of(spec)
        plan.shots[0].duration_seconds = durations[0]
        return plan
    prompt = spec.prompt.strip()
    count = len(durations)
    plan = render_pb2.RenderPlan(
        shots=[
            render_pb2.Shot(
                prompt=f"{prompt} (shot {index + 1} of {count})",
                duration_seconds=seconds,
                aspect_ratio=spec.aspect_ratio,
                seed=shot_seed(spec.seed, index),
                resolution=spec.resolution,
            )
            for index, seconds in enumerate(durations)
        ]
    )
    if spec.first_frame.data or spec.first_frame.uri:
        plan.shots[0].first_frame.CopyFrom(spec.first_frame)
    return plan


def shot_seed(seed: int, index: int) -> int:
    """Shot `index`'s seed from the spec's."""
    # 0 stays 0: each renderer then derives the seed from the shot's own prompt.
    return (seed + index) % _SEED_MODULUS if seed else 0


def _limits(clip: ClipLimits) -> str:
    renders = (
        ", ".join(f"{length:g}" for length in clip.allowed) or f"{clip.min_seconds:g} to {clip.max_seconds:g}"
    )
    return f"{backend_name(clip.backend)} {renders} s"


@functools.lru_cache(maxsize=64)  # the same few sets of backends plan every job
def _families(clips: tuple[ClipLimits, ...]) -> list[tuple[ClipLimits, ...]]:
    """Rule 2's families, most preferred first: the backends accepting each candidate length."""
    candidates = {
        length
        for clip in clips
        for length in clip.allowed or (clip.max_seconds,)
        if length > 0 and clip.accepts(length)
    }
    ranked = sorted(candidates, key=lambda length: (-sum(clip.accepts(length) for clip in clips), -length))
    families: list[tuple[ClipLimits, ...]] = []
    for length in ranked:
        family = tuple(clip for clip in clips if clip.accepts(length))
        if family not in families:
            families.append(family)
    return families


@functools.lru_cache(maxsize=64)
def _common_lengths(family: tuple[ClipLimits, ...]) -> _Lengths:
    exact_clips = [clip for clip in family if clip.allowed]
    if not exact_clips:
        return _Lengths(
            (), max(clip.min_seconds for clip in family), min(clip.max_seconds for clip in family)
        )
    common = sorted(
        {
            length
            for clip in exact_clips
            for length in clip.allowed
            if length > 0 and all(member.accepts(length) for member in family)
        }
    )
    exact: list[float] = []
    for length in common:
        # Two backends may spell one length a hair apart: keep it once.
        if not exact or length - exact[-1] >= _DURATION_EPSILON:
            exact.append(length)
    return _Lengths(tuple(exact), exact[0], exact[-1])


def _closest_cut(duration: float, lengths: _Lengths) -> _Cut:
    """The best cut by rule 3's order, searching from the fewest shots that could come close."""
    best: _Cut | None = None
    count = max(1, math.floor(duration / lengths.high))
    # Fewer shots fall further short; more than this overshoot by more than the best so far (n shots
    # total at least n x the shortest length), so they are never closer.
    while best is None or (best.error > _NOISE and count * lengths.low - duration < best.error - _NOISE):
        for candidate in _cuts(duration, count, lengths):
            if best is None or candidate.rank() < best.rank():
                best = candidate
        count += 1
    return best


def _cuts(duration: float, count: int, lengths: _Lengths) -> Iterator[_Cut]:
    """The closest cuts of `count` shots: every other cut of the lengths is further from `duration`."""
    if not lengths.exact:
        total = min(max(duration, count * lengths.low), count * lengths.high)
        # Kept inside the range against rounding: the total then moves by a hair at most.
        shot = min(max(total / count, lengths.low), lengths.high)
        yield _Cut((shot,) * count, total, abs(total - duration), 0.0)
        return
    exact = lengths.exact
    # The lengths either side of the mean shot: one length for every shot, the nearest below and above.
    above = bisect.bisect_left(exact, duration / count)
    for length in exact[max(above - 1, 0) : above + 1]:
        yield _Cut((length,) * count, count * length, abs(count * length - duration), 0.0)
    if not 0 < above < len(exact):
        return
    # A mix of the two: only the pair around the mean comes closer than one length, and the total is
    # linear in the number of long shots, so the closest mixes round that number down or up.
    long, short = exact[above], exact[above - 1]
    share = (duration - count * short) / (long - short)
    for longs in sorted({math.floor(share), math.ceil(share)}):
        if 0 < longs < count:
            total = longs * long + (count - longs) * short
            shots = (long,) * longs + (short,) * (count - longs)
            yield _Cut(shots, total, abs(total - duration), long - short)
