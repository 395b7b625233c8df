"""What the router's exclusion codes (RouteCandidate.exclusions) add up to: shared by the router, for
the reason of a render nothing can take, and the gateway, for its budget policy."""

from collections.abc import Iterable, Sequence

from aiprod.router.v1 import router_pb2


def budget_alone_blocks(exclusions: Iterable[Sequence[int]]) -> bool:
    """Whether the budget is what stops a render, given each candidate's exclusion codes: no candidate
    is eligible (every one has codes) and one is left out for the budget left and for nothing else, so
    money alone would make it eligible.

    The other candidates do not count either way: a backend that cannot render the shot, is under the
    floor or is down (as the local stand-in is, in a mesh with providers) never takes the render,
    whatever the budget."""
    codes = [list(candidate) for candidate in exclusions]
    return all(codes) and any(over_budget_alone(candidate) for candidate in codes)


def over_budget_alone(exclusions: Sequence[int]) -> bool:
    """Whether one candidate is left out for the budget left and for nothing else."""
    return set(exclusions) == {router_pb2.EXCLUSION_OVER_BUDGET}
