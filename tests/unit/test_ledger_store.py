"""The ledger store's contract, run against every implementation: SQLite and PostgreSQL."""

import asyncio
import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from aiprod_kit import database
from aiprod_kit.database import Database
from aiprod_kit.retention import Retention
from aiprod_metrics.ledger import (
    BudgetExceeded,
    Caps,
    KeyConflict,
    LedgerStore,
    Spend,
    SqlLedgerStore,
    State,
    Totals,
    UnknownKey,
    WrongState,
)

USD = 1_000_000
TTL = timedelta(hours=1)
NO_CAPS = Caps(tenant=0, everyone=0)
# aiprod.common.v1.Backend values: the store keeps them as integers.
RUNWAY, VEO = 2, 3


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2025, 6, 1, 12, 0, tzinfo=UTC))


@pytest.fixture
def open_store(open_database, clock):
    """Opens a store on the one ledger: another connection each call, as another process would have."""

    async def open_one(time_zone=UTC) -> LedgerStore:
        return await SqlLedgerStore.open(await open_database("ledger", synchronous="FULL"), time_zone, clock)

    return open_one


@pytest.fixture
async def store(open_store) -> LedgerStore:
    return await open_store()


async def test_a_reservation_is_made_once_per_key(store):
    first, fresh = await store.reserve("attempt-1", "acme", "job-1", 2 * USD, NO_CAPS, TTL)
    again, fresh_again = await store.reserve("attempt-1", "acme", "job-1", 2 * USD, NO_CAPS, TTL)
    assert (fresh, fresh_again) == (True, False)
    assert again == first
    assert first.state == State.RESERVED
    assert first.expires == first.created + TTL
    assert (await store.day_totals("acme")).tenant == Totals(spent=0, reserved=2 * USD, expired=0)


@pytest.mark.parametrize(("tenant", "job_id"), [("other", "job-1"), ("acme", "job-2")])
async def test_a_key_reused_for_another_tenant_or_job_conflicts(store, tenant, job_id):
    await store.reserve("attempt-1", "acme", "job-1", 2 * USD, NO_CAPS, TTL)
    with pytest.raises(KeyConflict) as conflict:
        await store.reserve("attempt-1", tenant, job_id, 2 * USD, NO_CAPS, TTL)
    assert conflict.value.existing.amount == 2 * USD
    assert (await store.day_totals("acme")).everyone.reserved == 2 * USD


async def test_a_repeat_with_another_amount_or_backend_returns_the_first_reservation(open_store):
    store = await open_store()
    caps = Caps(tenant=0, everyone=3 * USD)
    first, _ = await store.reserve("attempt-1", "acme", "job-1", 2 * USD, caps, TTL, RUNWAY)
    assert (first.amount, first.backend) == (2 * USD, RUNWAY)
    # A router that restarted mid-attempt, with a new estimate and ranking: the attempt stays at
    # Runway, at its first amount, and nothing more is reserved (3 USD more would not even fit).
    again, fresh = await store.reserve("attempt-1", "acme", "job-1", 3 * USD, caps, TTL, VEO)
    assert (again, fresh) == (first, False)
    assert (await store.day_totals("acme")).tenant == Totals(spent=0, reserved=2 * USD, expired=0)
    # The backend is kept by the ledger, not by the process.
    await store.close()
    reopened = await open_store()
    assert (await reopened.get("attempt-1")).backend == RUNWAY
    assert await reopened.reserve("attempt-1", "acme", "job-1", USD, caps, TTL) == (first, False)


async def test_a_ledger_without_the_backend_column_gets_it_on_opening(open_database, clock):
    database = await open_database("ledger", synchronous="FULL")
    # The reservations table as it was before reservations recorded their backend.
    old_table = """
CREATE TABLE reservations (
    key TEXT PRIMARY KEY, tenant TEXT NOT NULL, job_id TEXT NOT NULL, amount BIGINT NOT NULL,
    state TEXT NOT NULL, actual BIGINT, created BIGINT NOT NULL, expires BIGINT NOT NULL, settled BIGINT,
    day TEXT NOT NULL, expired_day TEXT
)"""
    await database.create_schema({"sqlite": old_table, "postgresql": old_table})
    async with database.transaction() as transaction:
        await transaction.execute(
            "INSERT INTO reservations (key, tenant, job_id, amount, state, created, expires, day) "
            "VALUES ('old', 'acme', 'job-0', 1000000, 'reserved', 0, 9000000000000000, '2025-06-01')"
        )
    await database.close()
    store = await SqlLedgerStore.open(await open_database("ledger", synchronous="FULL"), UTC, clock)
    try:
        assert (await store.get("old")).backend == 0  # not named when it was made
        new, _ = await store.reserve("new", "acme", "job-1", USD, NO_CAPS, TTL, VEO)
        assert (await store.get("new")) == new and new.backend == VEO
        assert (await store.day_totals("acme")).tenant.reserved == 2 * USD
    finally:
        await store.close()


async def test_the_tenant_and_global_caps_bound_spent_plus_reserved(store):
    caps = Caps(tenant=5 * USD, everyone=8 * USD)
    await store.reserve("a1", "acme", "", 3 * USD, caps, TTL)
    await store.commit("a1", 3 * USD)
    await store.reserve("a2", "acme", "", 2 * USD, caps, TTL)  # acme now at its cap exactly
    with pytest.raises(BudgetExceeded) as refused:
        await store.reserve("a3", "acme", "", 1, caps, TTL)
    assert (refused.value.tenant, refused.value.cap, refused.value.remaining) == ("acme", 5 * USD, 0)
    await store.reserve("b1", "bravo", "", 3 * USD, caps, TTL)  # everyone at the global cap
    with pytest.raises(BudgetExceeded) as refused:
        await store.reserve("b2", "bravo", "", USD, caps, TTL)
    assert (refused.value.tenant, refused.value.cap, refused.value.remaining, refused.value.asked) == (
        None,
        8 * USD,
        0,
        USD,
    )
    assert await store.get("a3") is None and await store.get("b2") is None
    # Releasing frees money under both caps.
    await store.release("a2")
    await store.reserve("b3", "bravo", "", 2 * USD, caps, TTL)
    totals = await store.day_totals("bravo")
    assert totals.tenant == Totals(spent=0, reserved=5 * USD, expired=0)
    assert totals.everyone == Totals(spent=3 * USD, reserved=5 * USD, expired=0)


async def test_a_refusal_names_the_tighter_cap(store):
    caps = Caps(tenant=10 * USD, everyone=4 * USD)
    await store.reserve("a1", "acme", "", 3 * USD, caps, TTL)
    with pytest.raises(BudgetExceeded) as refused:
        await store.reserve("a2", "acme", "", 20 * USD, caps, TTL)  # over both: 7 left of acme's, 1 of all
    assert (refused.value.tenant, refused.value.remaining) == (None, USD)


async def test_racing_reservations_never_pass_the_cap_even_from_several_connections(open_store):
    stores = [await open_store(), await open_store(), await open_store()]
    caps = Caps(tenant=0, everyone=10 * USD)

    async def reserve(n: int) -> bool:
        try:
            await stores[n % 3].reserve(f"k{n}", f"t{n % 2}", "", USD // 10, caps, TTL)
        except BudgetExceeded as refused:
            assert refused.remaining == 0
            return False
        return True

    outcomes = await asyncio.gather(*(reserve(n) for n in range(300)))
    assert sum(outcomes) == 100
    assert (await stores[0].day_totals("t0")).everyone.reserved == 10 * USD


async def test_racing_repeats_of_one_key_reserve_once(open_store):
    stores = [await open_store(), await open_store()]
    outcomes = await asyncio.gather(
        *(stores[n % 2].reserve("same", "acme", "job", USD, NO_CAPS, TTL) for n in range(20))
    )
    assert [fresh for _, fresh in outcomes].count(True) == 1
    assert len({reservation for reservation, _ in outcomes}) == 1
    assert (await stores[0].day_totals("acme")).tenant.reserved == USD


async def test_commit_records_the_actual_cost_once(store):
    await store.reserve("a1", "acme", "job-1", 2 * USD, Caps(0, 2 * USD), TTL)
    committed, before = await store.commit("a1", 3 * USD)  # over the estimate: recorded as it is
    assert (committed.state, committed.actual, before) == (State.COMMITTED, 3 * USD, State.RESERVED)
    assert committed.variance_ratio == 1.5
    again, before = await store.commit("a1", 3 * USD)
    assert (again, before) == (committed, State.COMMITTED)
    with pytest.raises(WrongState):
        await store.commit("a1", 2 * USD)
    with pytest.raises(WrongState):
        await store.release("a1")
    with pytest.raises(WrongState):  # settled: the key is spent
        await store.reserve("a1", "acme", "job-1", 2 * USD, NO_CAPS, TTL)
    assert (await store.day_totals("acme")).tenant == Totals(spent=3 * USD, reserved=0, expired=0)
    with pytest.raises(UnknownKey):
        await store.commit("nope", 1)
    with pytest.raises(UnknownKey):
        await store.release("nope")


async def test_release_frees_the_money_once(store):
    await store.reserve("a1", "acme", "job-1", 2 * USD, NO_CAPS, TTL)
    released, before = await store.release("a1")
    assert (released.state, before) == (State.RELEASED, State.RESERVED)
    assert await store.get("a1") == released  # what it answers is what it keeps
    assert (await store.release("a1"))[1] == State.RELEASED
    with pytest.raises(WrongState):
        await store.commit("a1", USD)
    with pytest.raises(WrongState):
        await store.reserve("a1", "acme", "job-1", 2 * USD, NO_CAPS, TTL)
    assert (await store.day_totals("acme")).tenant == Totals(0, 0, 0)


async def test_overdue_reservations_expire_once_and_may_still_be_committed(store, clock):
    await store.reserve("stuck", "acme", "job-1", 2 * USD, NO_CAPS, TTL)
    await store.reserve("young", "acme", "job-2", USD, NO_CAPS, TTL * 2)
    assert await store.expire_overdue() == []
    clock.advance(TTL)
    expired = await store.expire_overdue()
    assert [(r.key, r.job_id, r.state) for r in expired] == [("stuck", "job-1", State.EXPIRED)]
    assert await store.expire_overdue() == []
    # Expiry frees nothing: the attempt may have been billed, so it is spent at its worst case.
    assert (await store.day_totals("acme")).tenant == Totals(
        spent=2 * USD, reserved=USD, expired=1, uncertain=2 * USD
    )
    # The stuck job finished after all: its actual replaces the worst case.
    committed, before = await store.commit("stuck", USD // 2)
    assert (committed.state, committed.actual, before) == (State.COMMITTED, USD // 2, State.EXPIRED)
    assert await store.get("stuck") == committed  # its expiry's day kept
    assert (await store.day_totals("acme")).tenant == Totals(spent=USD // 2, reserved=USD, expired=1)


async def test_an_expired_reservation_may_be_released(store, clock):
    await store.reserve("stuck", "acme", "job-1", 2 * USD, NO_CAPS, TTL)
    clock.advance(TTL)
    await store.expire_overdue()
    released, before = await store.release("stuck")
    assert (released.state, before) == (State.RELEASED, State.EXPIRED)
    assert await store.get("stuck") == released
    # Known not to have billed: its money is free again.
    assert (await store.day_totals("acme")).tenant == Totals(spent=0, reserved=0, expired=1)


async def test_expired_money_counts_against_the_caps_until_reconciled(store, clock):
    caps = Caps(tenant=0, everyone=5 * USD)
    await store.reserve("stuck", "acme", "job-1", 3 * USD, caps, TTL, RUNWAY)
    await store.reserve("lost", "bravo", "job-2", USD, caps, TTL, VEO)
    clock.advance(TTL)
    assert len(await store.expire_overdue()) == 2
    # 2 USD would fit only if the expired 4 USD were freed.
    with pytest.raises(BudgetExceeded) as refused:
        await store.reserve("next", "acme", "job-3", 2 * USD, caps, TTL)
    assert (refused.value.tenant, refused.value.remaining) == (None, USD)
    assert await store.get("next") is None
    # A repeat of an expired attempt is still that attempt: returned as it was, reserving nothing.
    stuck, fresh = await store.reserve("stuck", "acme", "job-1", 2 * USD, caps, TTL, VEO)
    assert (stuck.state, stuck.amount, stuck.backend, fresh) == (State.EXPIRED, 3 * USD, RUNWAY, False)
    # A late commit under the worst case frees the difference; a late release frees it all.
    await store.commit("stuck", 2 * USD)
    await store.reserve("next", "acme", "job-3", 2 * USD, caps, TTL)
    with pytest.raises(BudgetExceeded):
        await store.reserve("more", "acme", "job-4", 2 * USD, caps, TTL)
    await store.release("lost")
    await store.reserve("more", "acme", "job-4", USD, caps, TTL)
    assert (await store.day_totals("acme")).everyone == Totals(
        spent=2 * USD, reserved=3 * USD, expired=2, uncertain=0
    )


async def test_uncertain_money_is_the_days_expired_unreconciled_reservations(open_store, clock):
    store = await open_store()
    await store.reserve("a1", "acme", "job-1", 3 * USD, NO_CAPS, TTL)
    await store.reserve("a2", "acme", "job-2", 2 * USD, NO_CAPS, TTL)
    await store.reserve("b1", "bravo", "job-3", USD, NO_CAPS, TTL)
    await store.reserve("settled", "bravo", "job-4", 4 * USD, NO_CAPS, TTL)
    await store.commit("settled", 4 * USD)
    clock.advance(TTL)
    await store.reserve("open", "acme", "job-5", 5 * USD, NO_CAPS, TTL)
    assert [r.key for r in await store.expire_overdue()] == ["a1", "a2", "b1"]
    acme = await store.day_totals("acme")
    assert acme.tenant == Totals(spent=5 * USD, reserved=5 * USD, expired=2, uncertain=5 * USD)
    assert acme.everyone == Totals(spent=10 * USD, reserved=5 * USD, expired=3, uncertain=6 * USD)
    await store.commit("a1", 3 * USD)
    await store.release("b1")
    acme = await store.day_totals("acme")
    assert acme.tenant == Totals(spent=5 * USD, reserved=5 * USD, expired=2, uncertain=2 * USD)
    assert acme.everyone == Totals(spent=9 * USD, reserved=5 * USD, expired=3, uncertain=2 * USD)
    # It stays the same after a restart: the ledger holds it, not the process.
    await store.close()
    assert await (await open_store()).day_totals("acme") == acme


async def test_days_turn_at_midnight_in_the_budget_time_zone(open_store, clock):
    new_york = ZoneInfo("America/New_York")
    store = await open_store(new_york)
    caps = Caps(tenant=0, everyone=5 * USD)
    clock.now = datetime(2025, 3, 9, 4, 30, tzinfo=UTC)  # 23:30 on 8 March in New York (EST)
    assert store.today() == "2025-03-08"
    late, _ = await store.reserve("late", "acme", "job-1", 5 * USD, caps, timedelta(hours=2))
    assert late.day == "2025-03-08"
    with pytest.raises(BudgetExceeded):
        await store.reserve("too-late", "acme", "", USD, caps, TTL)
    clock.advance(timedelta(hours=1))  # 00:30 on 9 March there, still 9 March in UTC
    assert store.today() == "2025-03-09"
    assert (await store.day_totals("acme")).everyone == Totals(0, 0, 0)
    # A new day, a new budget; yesterday's reservation, committed today, stays yesterday's spend.
    await store.reserve("early", "acme", "", 5 * USD, caps, TTL)
    await store.commit("late", 4 * USD)
    assert (await store.day_totals("acme")).everyone == Totals(spent=0, reserved=5 * USD, expired=0)
    # Expiry counts on the day it happens; its money stays the day's it was reserved on.
    clock.advance(timedelta(hours=1))
    assert [r.key for r in await store.expire_overdue()] == ["early"]
    assert (await store.day_totals("acme")).everyone == Totals(
        spent=5 * USD, reserved=0, expired=1, uncertain=5 * USD
    )


async def test_the_ledger_survives_reopening(open_store):
    first = await open_store()
    await first.reserve("a1", "acme", "job-1", 2 * USD, NO_CAPS, TTL)
    await first.reserve("a2", "acme", "job-2", 3 * USD, NO_CAPS, TTL)
    await first.commit("a1", USD)
    before = await first.day_totals("acme")
    await first.close()
    second = await open_store()
    assert await second.day_totals("acme") == before
    assert (await second.get("a1")).actual == USD
    assert (await second.reserve("a2", "acme", "job-2", 3 * USD, NO_CAPS, TTL))[1] is False
    await second.close()


async def test_a_sweep_expires_more_reservations_than_one_statement_names_in_expiry_order(
    store, clock, monkeypatch
):
    monkeypatch.setattr(database, "IN_LIST_SIZE", 2)  # a statement names at most 1,000 at a time
    for n in (4, 0, 3, 1, 2):
        await store.reserve(f"k{n}", "acme", f"job-{n}", USD, NO_CAPS, TTL + timedelta(seconds=n))
    clock.advance(TTL + timedelta(seconds=4))
    assert [r.key for r in await store.expire_overdue()] == ["k0", "k1", "k2", "k3", "k4"]
    assert (await store.day_totals("acme")).tenant.expired == 5


async def test_racing_sweeps_expire_each_reservation_once(open_store, clock):
    stores = [await open_store(), await open_store()]
    for n in range(20):
        await stores[0].reserve(f"k{n}", "acme", f"job-{n}", USD, NO_CAPS, TTL)
    clock.advance(TTL)
    swept = await asyncio.gather(*(stores[n % 2].expire_overdue() for n in range(6)))
    keys = [reservation.key for sweep in swept for reservation in sweep]
    assert sorted(keys) == sorted(f"k{n}" for n in range(20))
    assert (await stores[1].day_totals("acme")).tenant == Totals(
        spent=20 * USD, reserved=0, expired=20, uncertain=20 * USD
    )


# Tenants' own caps, and spend over days -------------------------------------------------------------


async def test_a_tenants_own_cap_replaces_the_default_and_zero_leaves_only_the_global_cap(open_store):
    store = await open_store()
    caps = Caps(tenant=2 * USD, everyone=10 * USD)
    assert await store.tenant_cap("acme") is None
    await store.set_tenant_cap("acme", 5 * USD)
    await store.set_tenant_cap("bravo", 0)
    assert (await store.tenant_cap("acme"), await store.tenant_cap("bravo")) == (5 * USD, 0)
    # acme: its own 5 USD, over the default 2 USD.
    await store.reserve("a1", "acme", "", 4 * USD, caps, TTL)
    with pytest.raises(BudgetExceeded) as refused:
        await store.reserve("a2", "acme", "", 2 * USD, caps, TTL)
    assert (refused.value.tenant, refused.value.cap, refused.value.remaining) == ("acme", 5 * USD, USD)
    # charlie, without a cap of its own: the default.
    with pytest.raises(BudgetExceeded) as refused:
        await store.reserve("c1", "charlie", "", 3 * USD, caps, TTL)
    assert (refused.value.tenant, refused.value.cap) == ("charlie", 2 * USD)
    # bravo: no cap of its own, only everyone's (6 USD left of it).
    await store.reserve("b1", "bravo", "", 5 * USD, caps, TTL)
    with pytest.raises(BudgetExceeded) as refused:
        await store.reserve("b2", "bravo", "", 2 * USD, caps, TTL)
    assert (refused.value.tenant, refused.value.remaining) == (None, USD)
    totals = await store.day_totals("acme")
    assert (totals.tenant_cap, totals.tenant.reserved) == (5 * USD, 4 * USD)
    assert (await store.day_totals("charlie")).tenant_cap is None
    # A cap is the ledger's: another connection (another replica) and a reopened store see it.
    await store.close()
    other = await open_store()
    assert await other.tenant_cap("acme") == 5 * USD
    await other.set_tenant_cap("acme", 3 * USD)  # under what it has reserved: nothing more fits
    with pytest.raises(BudgetExceeded) as refused:
        await other.reserve("a3", "acme", "", 1, caps, TTL)
    assert (refused.value.cap, refused.value.remaining) == (3 * USD, 0)
    # Cleared: the default applies again.
    await other.clear_tenant_cap("bravo")
    assert await other.tenant_cap("bravo") is None
    with pytest.raises(BudgetExceeded) as refused:
        await other.reserve("b3", "bravo", "", 1, caps, TTL)
    assert (refused.value.tenant, refused.value.cap) == ("bravo", 2 * USD)


async def test_racing_reservations_never_pass_a_tenants_own_cap(open_store):
    stores = [await open_store(), await open_store()]
    await stores[0].set_tenant_cap("acme", 3 * USD)
    caps = Caps(tenant=USD, everyone=0)

    async def reserve(n: int) -> bool:
        try:
            await stores[n % 2].reserve(f"k{n}", "acme", "", USD // 10, caps, TTL)
        except BudgetExceeded:
            return False
        return True

    assert sum(await asyncio.gather(*(reserve(n) for n in range(60)))) == 30
    assert (await stores[1].day_totals("acme")).tenant.reserved == 3 * USD


async def test_spend_over_days_counts_as_each_days_budget_does(store, clock):
    # 30 May: committed 1 USD, released 2 USD; another tenant's 7 USD.
    clock.now = datetime(2025, 5, 30, 12, 0, tzinfo=UTC)
    await store.reserve("d1-a", "acme", "", 2 * USD, NO_CAPS, TTL)
    await store.commit("d1-a", USD)
    await store.reserve("d1-b", "acme", "", 2 * USD, NO_CAPS, TTL)
    await store.release("d1-b")
    await store.reserve("d1-x", "other", "", 7 * USD, NO_CAPS, TTL)
    await store.commit("d1-x", 7 * USD)
    # 31 May: one expired unsettled (3 USD, uncertain: spent at its worst case).
    clock.now = datetime(2025, 5, 31, 12, 0, tzinfo=UTC)
    await store.reserve("d2-a", "acme", "", 3 * USD, NO_CAPS, TTL)
    clock.advance(TTL)
    await store.expire_overdue()
    # 1 June: one open (4 USD), one committed over its estimate (5 USD for 2).
    clock.now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    await store.reserve("d3-a", "acme", "", 4 * USD, NO_CAPS, TTL)
    await store.reserve("d3-b", "acme", "", 2 * USD, NO_CAPS, TTL)
    await store.commit("d3-b", 5 * USD)

    assert await store.spend("acme", "2025-05-30", "2025-06-01") == Spend(spent=9 * USD, reserved=4 * USD)
    assert await store.spend("acme", "2025-05-30", "2025-05-30") == Spend(spent=USD, reserved=0)
    assert await store.spend("acme", "2025-05-31", "2025-05-31") == Spend(spent=3 * USD, reserved=0)
    assert await store.spend("acme", "2025-06-01", "2025-06-01") == Spend(spent=5 * USD, reserved=4 * USD)
    assert await store.spend("acme", "2025-01-01", "2025-05-29") == Spend(0, 0)
    assert await store.spend("nobody", "2025-01-01", "2025-12-31") == Spend(0, 0)
    # A day's spend in the range is what its budget reported that day.
    today = await store.day_totals("acme")
    assert (today.tenant.spent, today.tenant.reserved) == (5 * USD, 4 * USD)
    # A late commit of the expired one replaces its worst case.
    await store.commit("d2-a", USD)
    assert await store.spend("acme", "2025-05-30", "2025-06-01") == Spend(spent=7 * USD, reserved=4 * USD)


# Each day's money by tenant, summed from the reservations: what the ledger's day_money must hold.
_MONEY_FROM_RESERVATIONS = (
    "SELECT day, tenant, COALESCE(SUM(CASE WHEN state = 'committed' THEN actual END), 0), "
    "COALESCE(SUM(CASE WHEN state = 'reserved' THEN amount END), 0), "
    "COALESCE(SUM(CASE WHEN state = 'expired' THEN amount END), 0) "
    "FROM reservations GROUP BY day, tenant"
)


async def _money(database: Database, query: str) -> set[tuple]:
    return {
        tuple(int(v) if i > 1 else v for i, v in enumerate(row)) for row in await database.fetchall(query)
    }


async def test_each_days_money_is_kept_equal_to_its_reservations_sums(open_database, open_store, clock):
    """The caps and totals read each day's money from sums the database keeps as reservations change
    (not summed over the day's reservations at each reservation): after every kind of change, on
    several days and tenants, the kept sums equal the reservations' own."""
    store = await open_store()
    reader = await open_database("ledger", synchronous="FULL")
    rng = random.Random(19)
    open_keys: list[str] = []
    expired_keys: list[str] = []
    try:
        for step in range(240):
            roll = rng.random()
            if roll < 0.45 or not (open_keys or expired_keys):
                key = f"k{step}"
                await store.reserve(
                    key, rng.choice(["acme", "globex", "initech"]), "", rng.randint(1, 9) * USD, NO_CAPS, TTL
                )
                open_keys.append(key)
            elif roll < 0.65:
                keys = rng.choice([keys for keys in (open_keys, expired_keys) if keys])
                await store.commit(keys.pop(rng.randrange(len(keys))), rng.randint(0, 12) * USD)
            elif roll < 0.8:
                keys = rng.choice([keys for keys in (open_keys, expired_keys) if keys])
                await store.release(keys.pop(rng.randrange(len(keys))))
            elif roll < 0.9:
                clock.advance(TTL)  # everything open expires; some days turn
                expired_keys += [reservation.key for reservation in await store.expire_overdue()]
                open_keys.clear()
            else:
                clock.advance(timedelta(hours=rng.randint(1, 30)))
            kept = await _money(reader, "SELECT day, tenant, committed, reserved, uncertain FROM day_money")
            assert kept == await _money(reader, _MONEY_FROM_RESERVATIONS), step
        assert len({day for day, *_ in kept}) > 3
    finally:
        await reader.close()


async def test_a_ledger_from_before_the_kept_sums_gets_them_on_opening(open_database, open_store, clock):
    store = await open_store()
    await store.reserve("a", "acme", "", 2 * USD, NO_CAPS, TTL)
    await store.reserve("b", "acme", "", 3 * USD, NO_CAPS, TTL)
    await store.commit("b", USD)
    await store.reserve("c", "globex", "", 4 * USD, NO_CAPS, TTL)
    # As the version before left it: no sums kept, no triggers.
    database = await open_database("ledger", synchronous="FULL")
    async with database.transaction() as transaction:
        if database.dialect == "sqlite":
            for name in ("reservations_day_money_insert", "reservations_day_money_update"):
                await transaction.execute(f"DROP TRIGGER {name}")
        else:
            await transaction.execute("DROP TRIGGER reservations_day_money ON reservations")
        await transaction.execute("DROP TABLE day_money")
        # A reservation written by that version.
        await transaction.execute(
            "INSERT INTO reservations (key, tenant, job_id, amount, state, created, expires, day) "
            "VALUES ('old', 'acme', 'job-0', 5000000, 'reserved', 0, 9000000000000000, '2025-06-01')"
        )
    await database.close()
    reopened = await open_store()
    totals = await reopened.day_totals("acme")
    assert (totals.tenant.spent, totals.tenant.reserved) == (USD, 7 * USD)
    assert totals.everyone.reserved == 11 * USD
    await reopened.reserve("d", "acme", "", USD, Caps(tenant=9 * USD, everyone=0), TTL)
    with pytest.raises(BudgetExceeded):
        await reopened.reserve("e", "acme", "", USD, Caps(tenant=9 * USD, everyone=0), TTL)


async def _keys(store) -> set[str]:
    return {row[0] for row in await store._db.fetchall("SELECT key FROM reservations")}


async def _settled(store, key: str, how: str, actual: int = USD) -> None:
    await store.reserve(key, "acme", f"job-{key}", 2 * USD, NO_CAPS, TTL)
    await (store.commit(key, actual) if how == "commit" else store.release(key))


async def _reported_money(store, first_day: str, last_day: str) -> tuple:
    """What every report reads of the days' money: spend over the days, and today's budgets."""
    totals = await store.day_totals("acme")
    return (
        await store.spend("acme", first_day, last_day),
        await store.spend("globex", first_day, last_day),
        (totals.tenant.spent, totals.tenant.reserved, totals.tenant.uncertain),
        (totals.everyone.spent, totals.everyone.reserved, totals.everyone.uncertain),
    )


async def test_a_purge_deletes_only_reservations_settled_before_the_cutoff_and_keeps_the_days_reported_money(
    store, clock
):
    await _settled(store, "committed-old", "commit", 3 * USD)
    await _settled(store, "released-old", "release")
    await store.reserve("expired-then-committed", "globex", "job-x", 4 * USD, NO_CAPS, TTL)
    await store.reserve("open", "acme", "job-open", USD, NO_CAPS, TTL * 48)
    await store.reserve("expired", "acme", "job-expired", 5 * USD, NO_CAPS, TTL)
    clock.advance(TTL)
    assert {r.key for r in await store.expire_overdue()} == {"expired-then-committed", "expired"}
    await store.commit("expired-then-committed", 2 * USD)
    cutoff = clock.now + timedelta(minutes=1)
    clock.advance(timedelta(minutes=1))
    await _settled(store, "committed-at-cutoff", "commit")
    clock.advance(timedelta(days=1))
    await _settled(store, "committed-new", "commit", 7 * USD)
    await _settled(store, "released-new", "release")
    before = await _reported_money(store, "2025-06-01", "2025-06-02")
    clock.now = datetime(2025, 6, 1, 23, tzinfo=UTC)  # on the first day again: its budgets
    first_day_before = await _reported_money(store, "2025-06-01", "2025-06-01")

    assert await store.purge(cutoff.timestamp(), 1000) == 3
    # Open and expired ones are never deleted, however old: their money is not settled.
    assert await _keys(store) == {"open", "expired", "committed-at-cutoff", "committed-new", "released-new"}
    assert await store.purge(cutoff.timestamp(), 1000) == 0
    # No trigger runs on DELETE: each day's money is as it was.
    assert await _reported_money(store, "2025-06-01", "2025-06-01") == first_day_before
    clock.now = datetime(2025, 6, 2, 23, tzinfo=UTC)
    assert await _reported_money(store, "2025-06-01", "2025-06-02") == before
    assert before[0] == Spend(spent=3 * USD + 5 * USD + USD + 7 * USD, reserved=USD)
    # A purged key is unknown again; a kept one settles as before.
    with pytest.raises(UnknownKey):
        await store.commit("committed-old", 3 * USD)
    with pytest.raises(UnknownKey):
        await store.release("released-old")
    assert (await store.commit("committed-new", 7 * USD))[1] == State.COMMITTED
    assert (await store.commit("expired", USD))[1] == State.EXPIRED


async def test_a_purge_deletes_a_batch_and_retention_repeats_it_until_none_is_left(store, clock):
    for index in range(7):
        await _settled(store, f"old-{index}", "commit" if index % 2 else "release")
        clock.advance(timedelta(seconds=1))
    await store.reserve("open", "acme", "job-open", USD, NO_CAPS, TTL)
    now = clock.now.timestamp()
    assert await store.purge(now, 3) == 3
    assert len(await _keys(store)) == 5 and "open" in await _keys(store)
    retention = Retention("settled reservations", store.purge, 3600.0, batch=3, clock=lambda: now + 3600.0)
    assert await retention.purge_once() == 4
    assert await _keys(store) == {"open"}


async def test_replicas_purging_at_once_both_succeed(open_store, clock):
    stores = [await open_store() for _ in range(2)]
    for index in range(50):
        await _settled(stores[index % 2], f"old-{index}", "commit" if index % 3 else "release")
    await stores[0].reserve("open", "acme", "job-open", USD, NO_CAPS, TTL)
    money = await _reported_money(stores[0], "2025-06-01", "2025-06-01")
    clock.advance(timedelta(seconds=1))
    deleted = await asyncio.gather(*(store.purge(clock.now.timestamp(), 30) for store in stores))
    assert sum(deleted) == 50
    assert await _keys(stores[1]) == {"open"}
    assert await _reported_money(stores[1], "2025-06-01", "2025-06-01") == money


async def test_retention_purges_reservations_settled_longer_ago_than_it_and_zero_keeps_them(store, clock):
    await _settled(store, "old", "commit")
    clock.advance(timedelta(days=400, seconds=2))
    await _settled(store, "young", "release")
    now = clock.now.timestamp() - 1  # "old" settled 400 days and a second before, "young" after it
    assert await Retention("reservations", store.purge, 0.0, clock=lambda: now).purge_once() == 0
    assert await _keys(store) == {"old", "young"}
    assert await Retention("reservations", store.purge, 400 * 86400.0, clock=lambda: now).purge_once() == 1
    assert await _keys(store) == {"young"}
