"""Repeated authentication failures from one peer: slowed down, logged once a window, counted.

A wrong key in a loop (a client misconfigured, a script guessing) must flood neither the gateway nor its
log. Failures are tracked per peer: the caller's IP address, without the port, so that one client's many
connections count together. In a window (60 s from a peer's first failure) the first few failures are
answered at once; each further one waits before its refusal, the wait doubling up to a cap. The wait is an
`await asyncio.sleep`: it holds no worker, and every other call is served meanwhile. A success changes
nothing: neither the caller's own count (another client behind the same address, a NAT, with a valid key
must not excuse a looping neighbour) nor any other peer's.

The log gets a peer's first failure of a window and, once the window is over, one line saying how many
there were in it; never one line per failure, never anything of the presented key. The metric
`aiprod.gateway.auth_failures` counts every failure by its ErrorInfo reason.

Memory is bounded: at most `max_peers` peers tracked (the one whose window began longest ago is dropped
first), and a peer is forgotten when its window ends.
"""

import asyncio
import ipaddress
import time
import urllib.parse
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import structlog

from aiprod_gateway.telemetry import AuthMetrics
from aiprod_kit.errors import ServiceError

log = structlog.get_logger()

FREE_FAILURES = 5  # failures a window answered at once
WINDOW_SECONDS = 60.0
FIRST_DELAY_SECONDS = 0.1  # the wait of the first failure past the free ones; it doubles from there
MAX_DELAY_SECONDS = 2.0
MAX_PEERS = 10_000
# Whose calls cannot be told apart: a context without a peer.
UNKNOWN_PEER = "unknown"
# Past this many doublings the wait is capped anyway; it keeps 2**n a small number.
_MAX_DOUBLINGS = 32


def peer_address(peer: str) -> str:
    """The IP address of a peer as gRPC names it ("ipv4:10.0.0.7:51234", "ipv6:[::1]:51234", with the
    brackets percent-encoded by some versions); an IPv4 client of a dual-stack server as its IPv4
    address. Anything else (a Unix socket) is itself: all its connections count together."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        host = urllib.parse.unquote(rest).rpartition(":")[0].removeprefix("[").removesuffix("]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return peer
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(address)
    return peer or UNKNOWN_PEER


def calling_peer(context: grpc.aio.ServicerContext) -> str:
    """The call's peer address."""
    return peer_address(context.peer())


@dataclass
class _Window:
    started: float
    failures: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


class AuthFailures:
    """The failures of one service's guard (GatewayService, AdminService), per peer.

    service: the service's full name, on the metric and the log lines. clock and sleep: time.monotonic
    and asyncio.sleep, replaced in tests.
    """

    def __init__(
        self,
        service: str,
        *,
        metrics: AuthMetrics | None = None,
        free_failures: int = FREE_FAILURES,
        window_seconds: float = WINDOW_SECONDS,
        first_delay_seconds: float = FIRST_DELAY_SECONDS,
        max_delay_seconds: float = MAX_DELAY_SECONDS,
        max_peers: int = MAX_PEERS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._service = service
        self._metrics = metrics or AuthMetrics()
        self._free_failures = free_failures
        self._window_seconds = window_seconds
        self._first_delay = first_delay_seconds
        self._max_delay = max_delay_seconds
        self._max_peers = max_peers
        self._clock = clock
        self._sleep = sleep
        # By the start of each peer's window, oldest first: what ends or is dropped first is in front.
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    @property
    def peers_tracked(self) -> int:
        return len(self._windows)

    async def refused(self, peer: str, error: ServiceError) -> None:
        """A call of the peer's is refused with error: counted, logged if it is the window's first, and
        returns when the refusal may be sent (at once, or after the peer's wait)."""
        delay = self.record(peer, error)
        if delay > 0:
            await self._sleep(delay)

    def record(self, peer: str, error: ServiceError) -> float:
        """Counts a refusal of the peer's call; returns the seconds its answer waits."""
        now = self._clock()
        self.sweep(now)
        window = self._windows.get(peer)
        if window is None:
            if len(self._windows) >= self._max_peers:
                self._close(*self._windows.popitem(last=False), now)
            window = self._windows[peer] = _Window(started=now)
        window.failures += 1
        window.reasons[error.reason] += 1
        self._metrics.failed(self._service, error.reason)
        if window.failures == 1:
            # The status message names no secret: never the presented key, at most a stored key's public
            # prefix (revoked, expired) or the tenant (disabled).
            log.warning(
                "authentication failed",
                peer=peer,
                service=self._service,
                reason=error.reason,
                why=error.message,
            )
        beyond = window.failures - self._free_failures
        if beyond <= 0:
            return 0.0
        return min(self._first_delay * 2 ** min(beyond - 1, _MAX_DOUBLINGS), self._max_delay)

    def sweep(self, now: float | None = None) -> None:
        """Forgets the peers whose window has ended, logging each one's summary. Cheap: it looks at the
        oldest window only, unless that one is over."""
        now = self._clock() if now is None else now
        while self._windows:
            peer, window = next(iter(self._windows.items()))
            if now - window.started < self._window_seconds:
                return
            del self._windows[peer]
            self._close(peer, window, now)

    def _close(self, peer: str, window: _Window, now: float) -> None:
        """The summary of a window that ended (or was dropped for room): only when the first failure, logged
        already, was not the only one."""
        if window.failures > 1:
            log.warning(
                "repeated authentication failures",
                peer=peer,
                service=self._service,
                failures=window.failures,
                seconds=round(min(now - window.started, self._window_seconds)),
                reasons=dict(window.reasons),
            )
