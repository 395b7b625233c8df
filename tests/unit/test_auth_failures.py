"""Repeated authentication failures per peer, on a fake clock with the waits recorded: the waits grow and
cap, a window ends and is forgotten, peers are independent, the tracked peers are bounded, the log holds
a peer's first failure and one summary a window, and the metric counts every failure by reason. Then the
two gateway guards, which send their refusals through it."""

import asyncio
from dataclasses import dataclass

import pytest
from helpers.telemetry import collected
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from structlog.testing import capture_logs

from aiprod.gateway.v1 import admin_pb2
from aiprod_gateway.auth import ADMIN_SERVICE, GATEWAY_SERVICE, AdminKeyGuard, ApiKeyGuard
from aiprod_gateway.auth_failures import UNKNOWN_PEER, AuthFailures, peer_address
from aiprod_gateway.keys import KeyMatch
from aiprod_gateway.telemetry import AuthMetrics
from aiprod_kit.errors import ErrorReason, PermissionDenied, ServiceError, Unauthenticated

WRONG = Unauthenticated("the API key is not valid")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Tracked:
    failures: AuthFailures
    clock: Clock
    waits: list[float]
    reader: InMemoryMetricReader

    async def fail(self, peer: str, error: ServiceError = WRONG, times: int = 1) -> list[float]:
        """Refuses `times` calls of the peer; the waits they were given (none for one answered at once)."""
        before = len(self.waits)
        for _ in range(times):
            await self.failures.refused(peer, error)
        return self.waits[before:]

    def counted(self) -> dict[tuple[str, str], float]:
        return {
            (labels["rpc.service"], labels["reason"]): value
            for labels, value in collected(self.reader).get("aiprod.gateway.auth_failures", [])
        }


def tracked(service: str = GATEWAY_SERVICE, **options: object) -> Tracked:
    clock, waits, reader = Clock(), [], InMemoryMetricReader()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    metrics = AuthMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))
    failures = AuthFailures(service, metrics=metrics, clock=clock, sleep=sleep, **options)  # type: ignore[arg-type]
    return Tracked(failures, clock, waits, reader)


def lines(logs: list[dict], event: str) -> list[dict]:
    return [line for line in logs if line["event"] == event]


async def test_the_first_failures_are_answered_at_once_then_the_wait_doubles_up_to_its_cap():
    t = tracked()
    assert await t.fail("10.0.0.7", times=5) == []
    assert await t.fail("10.0.0.7", times=8) == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    # However long the loop, the wait stays at the cap.
    assert set(await t.fail("10.0.0.7", times=2_000)) == {2.0}


async def test_a_window_ends_sixty_seconds_after_its_first_failure_and_the_peer_is_forgotten():
    t = tracked()
    await t.fail("10.0.0.7", times=7)
    t.clock.now += 59
    assert await t.fail("10.0.0.7") == [0.4]  # still the same window: the eighth failure
    t.clock.now += 1
    assert await t.fail("10.0.0.7", times=5) == []  # a new window: five at once again
    assert await t.fail("10.0.0.7") == [0.1]
    t.clock.now += 60
    t.failures.sweep()
    assert t.failures.peers_tracked == 0


async def test_peers_are_independent():
    t = tracked()
    await t.fail("10.0.0.7", times=10)
    assert await t.fail("10.0.0.8", times=5) == []
    assert await t.fail("10.0.0.8") == [0.1]
    assert await t.fail("10.0.0.7") == [2.0]


async def test_at_most_max_peers_are_tracked_the_oldest_window_dropped_first():
    t = tracked(max_peers=3)
    for peer in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        await t.fail(peer, times=6)
        t.clock.now += 1
    with capture_logs() as logs:
        await t.fail("10.0.0.4")
    assert t.failures.peers_tracked == 3
    # The oldest went with its summary; back, it starts from nothing.
    (summary,) = lines(logs, "repeated authentication failures")
    assert (summary["peer"], summary["failures"], summary["seconds"]) == ("10.0.0.1", 6, 3)
    assert await t.fail("10.0.0.2") == [0.2]
    assert await t.fail("10.0.0.1") == []
    assert t.failures.peers_tracked == 3


async def test_the_log_holds_the_first_failure_and_one_summary_a_window_never_a_line_per_failure():
    t = tracked()
    with capture_logs() as logs:
        await t.fail("10.0.0.7", times=29)
        await t.fail(
            "10.0.0.7", PermissionDenied("tenant acme is disabled", reason=ErrorReason.TENANT_DISABLED)
        )
        await t.fail("10.0.0.8")  # one failure: its first line says all
        assert len(logs) == 2
        t.clock.now += 60
        t.failures.sweep()
        t.failures.sweep()
        t.clock.now += 600
        t.failures.sweep()
    first = lines(logs, "authentication failed")
    assert [(line["peer"], line["reason"], line["why"]) for line in first] == [
        ("10.0.0.7", "UNAUTHENTICATED", "the API key is not valid"),
        ("10.0.0.8", "UNAUTHENTICATED", "the API key is not valid"),
    ]
    (summary,) = lines(logs, "repeated authentication failures")
    assert summary == {
        "event": "repeated authentication failures",
        "log_level": "warning",
        "peer": "10.0.0.7",
        "service": GATEWAY_SERVICE,
        "failures": 30,
        "seconds": 60,
        "reasons": {"UNAUTHENTICATED": 29, "TENANT_DISABLED": 1},
    }
    assert len(logs) == 3


async def test_a_peer_failing_without_end_logs_two_lines_a_window():
    t = tracked()
    with capture_logs() as logs:
        for _ in range(10 * 60):  # ten minutes, a failure a second
            await t.fail("10.0.0.7")
            t.clock.now += 1
    assert len(lines(logs, "authentication failed")) == 10
    assert len(lines(logs, "repeated authentication failures")) == 9  # the tenth window is not over yet


async def test_every_failure_is_counted_by_service_and_reason():
    t = tracked()
    await t.fail("10.0.0.7", times=12)
    await t.fail("10.0.0.8", PermissionDenied("tenant acme is disabled", reason=ErrorReason.TENANT_DISABLED))
    assert t.counted() == {(GATEWAY_SERVICE, "UNAUTHENTICATED"): 12, (GATEWAY_SERVICE, "TENANT_DISABLED"): 1}


async def test_a_waiting_refusal_holds_up_no_other_call():
    failures = AuthFailures(GATEWAY_SERVICE, free_failures=0, first_delay_seconds=5, max_delay_seconds=5)
    waiting = asyncio.create_task(failures.refused("10.0.0.7", WRONG))
    await asyncio.sleep(0)
    # Another peer's refusal waits its own (shorter) time and is through while the first still waits.
    quick = AuthFailures(GATEWAY_SERVICE, free_failures=0, first_delay_seconds=0.01)
    await asyncio.wait_for(quick.refused("10.0.0.8", WRONG), timeout=1)
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.7:51234", "10.0.0.7"),
        ("ipv6:[::1]:51234", "::1"),
        ("ipv6:%5B::1%5D:51234", "::1"),
        ("ipv6:[2001:DB8::7]:443", "2001:db8::7"),
        ("ipv6:[::ffff:10.0.0.7]:51234", "10.0.0.7"),
        ("unix:/run/aiprod/gateway.sock", "unix:/run/aiprod/gateway.sock"),
        ("", UNKNOWN_PEER),
    ],
)
def test_a_peer_is_its_ip_address_without_the_port(peer: str, address: str):
    assert peer_address(peer) == address


# The guards ---------------------------------------------------------------------------------------------

SECRET = "aiprod_0123456789ab_" + "S" * 32
GUESS = "aiprod_0123456789ab_" + "G" * 32


class Context:
    """A call's servicer context as a guard reads it: its peer and its metadata."""

    def __init__(self, peer: str, key: str | None = None) -> None:
        self._peer = peer
        self._metadata = (("authorization", f"Bearer {key}"),) if key is not None else ()

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def calling_with(self, key: str | None) -> "Context":
        """A call from the same peer with this key."""
        return Context(self._peer, key)


class Tenants:
    """A TenantStore with one key."""

    def __init__(self, disabled: bool = False) -> None:
        self.tenant = admin_pb2.Tenant(tenant_id="acme", tier=admin_pb2.SLA_TIER_GOLD, disabled=disabled)

    async def match(self, secret: str) -> KeyMatch | None:
        if secret != SECRET:
            return None
        return KeyMatch(admin_pb2.ApiKey(key_id="0123456789ab", prefix="aiprod_0123456789ab"), self.tenant)


async def refused_by(guard: ApiKeyGuard | AdminKeyGuard, context: Context) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await guard(context)  # type: ignore[arg-type]
    return caught.value


async def test_the_api_key_guard_slows_a_peer_that_keeps_failing_and_a_success_resets_nothing():
    t = tracked()
    guard = ApiKeyGuard(Tenants(), 5.0, failures=t.failures)  # type: ignore[arg-type]
    # Two connections of one address (another port, another client behind the same NAT), and another.
    looping, neighbour, other = (
        Context("ipv4:10.0.0.7:50001"),
        Context("ipv4:10.0.0.7:50002"),
        Context("ipv4:10.0.0.8:50001"),
    )
    with capture_logs() as logs:
        for key in (GUESS, None, "not-even-a-key", GUESS, GUESS, GUESS, GUESS):
            error = await refused_by(guard, looping.calling_with(key))
            assert (error.code.name, error.reason) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
        assert t.waits == [0.1, 0.2]
        # A valid key from the same address, or from another, is served at once, and resets nothing.
        await guard(neighbour.calling_with(SECRET))  # type: ignore[arg-type]
        await guard(other.calling_with(SECRET))  # type: ignore[arg-type]
        assert t.waits == [0.1, 0.2]
        await refused_by(guard, neighbour.calling_with(GUESS))
        assert t.waits == [0.1, 0.2, 0.4]
        t.clock.now += 60
        # A success sweeps: the window's summary is written though no failure follows.
        await guard(other.calling_with(SECRET))  # type: ignore[arg-type]
    assert [line["event"] for line in logs] == ["authentication failed", "repeated authentication failures"]
    assert logs[1]["failures"] == 8 and logs[1]["peer"] == "10.0.0.7"
    assert SECRET[20:] not in str(logs) and GUESS[20:] not in str(logs)
    assert t.counted() == {(GATEWAY_SERVICE, "UNAUTHENTICATED"): 8}


async def test_the_api_key_guard_counts_a_disabled_tenant_by_its_reason():
    t = tracked()
    guard = ApiKeyGuard(Tenants(disabled=True), 5.0, failures=t.failures)  # type: ignore[arg-type]
    error = await refused_by(guard, Context("ipv4:10.0.0.7:5").calling_with(SECRET))
    assert (error.code.name, error.reason) == ("PERMISSION_DENIED", "TENANT_DISABLED")
    assert t.counted() == {(GATEWAY_SERVICE, "TENANT_DISABLED"): 1}


async def test_the_admin_guard_gets_the_same_treatment():
    t = tracked(ADMIN_SERVICE)
    guard = AdminKeyGuard("the-admin-key", failures=t.failures)
    for _ in range(7):
        await refused_by(guard, Context("ipv4:10.0.0.7:5").calling_with("a-guess"))
    await guard(Context("ipv4:10.0.0.7:5").calling_with("the-admin-key"))  # type: ignore[arg-type]
    assert t.waits == [0.1, 0.2]
    off = tracked(ADMIN_SERVICE)
    error = await refused_by(AdminKeyGuard("", failures=off.failures), Context("ipv4:10.0.0.7:5", "a-guess"))
    assert error.reason == "PERMISSION_DENIED"
    assert t.counted() == {(ADMIN_SERVICE, "UNAUTHENTICATED"): 7}
    assert off.counted() == {(ADMIN_SERVICE, "PERMISSION_DENIED"): 1}
