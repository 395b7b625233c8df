"""The spend ledger of the metrics service: the real service as a process, through its generated stub."""

import asyncio
import json
import random
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from helpers.mesh import connect_metrics, error_info, field_violations
from helpers.postgres import assert_runs_on_its_store

from aiprod.common.v1 import backend_pb2, money_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod_kit.mesh import Mesh, ServiceStartError
from aiprod_kit.money import usd

USD = 1_000_000
CAP = 10 * USD
RUNWAY, VEO = backend_pb2.BACKEND_RUNWAY, backend_pb2.BACKEND_VEO
OK, NOTIFY, ECONOMY, EXHAUSTED = (
    metrics_pb2.BUDGET_LEVEL_OK,
    metrics_pb2.BUDGET_LEVEL_NOTIFY,
    metrics_pb2.BUDGET_LEVEL_ECONOMY,
    metrics_pb2.BUDGET_LEVEL_EXHAUSTED,
)

StartMetrics = Callable[..., Mesh]


@pytest.fixture
def start_metrics(tmp_path, database_environment) -> Iterator[StartMetrics]:
    """Starts a metrics service of its own, on a fresh ledger with a 10 USD daily cap unless told otherwise.
    Every test runs twice: on SQLite, and on PostgreSQL (database_environment)."""
    started: list[Mesh] = []

    def start(shared_with: Mesh | None = None, **environment: str) -> Mesh:
        """shared_with: another service's mesh, whose data directory (and so ledger) to share; on
        PostgreSQL every service of the test shares the one database anyway."""
        mesh = Mesh(
            shared_with.data_dir if shared_with else tmp_path / f"mesh-{len(started)}",
            free_ports=True,
            only=("metrics",),
            environment={"AIPROD_METRICS_DAILY_CAP_USD": "10", **database_environment, **environment},
        )
        started.append(mesh)
        mesh.start()
        assert_runs_on_its_store(mesh, "metrics", database_environment)
        return mesh

    yield start
    for mesh in started:
        mesh.stop()


def reserve_request(
    key: str, micros: int, tenant: str = "", job_id: str = "", backend: int = 0
) -> metrics_pb2.ReserveBudgetRequest:
    return metrics_pb2.ReserveBudgetRequest(
        reservation_key=key,
        tenant_id=tenant,
        amount=usd(micros),
        job_id=job_id or f"job-{key[:64]}",
        backend=backend,
    )


async def reserve(stub, key: str, micros: int, tenant: str = "", job_id: str = "") -> metrics_pb2.Reservation:
    return (await stub.ReserveBudget(reserve_request(key, micros, tenant, job_id))).reservation


async def attempt(
    stub, key: str, micros: int, tenant: str = ""
) -> metrics_pb2.Reservation | grpc.aio.AioRpcError:
    try:
        return await reserve(stub, key, micros, tenant)
    except grpc.aio.AioRpcError as error:
        return error


async def commit(stub, key: str, micros: int) -> None:
    await stub.CommitSpend(metrics_pb2.CommitSpendRequest(reservation_key=key, actual=usd(micros)))


async def release(stub, key: str) -> None:
    await stub.ReleaseBudget(metrics_pb2.ReleaseBudgetRequest(reservation_key=key))


async def budgets(stub, tenant: str = "") -> metrics_pb2.GetBudgetResponse:
    return await stub.GetBudget(metrics_pb2.GetBudgetRequest(tenant_id=tenant))


async def failure(call) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def violated_fields(error: grpc.aio.AioRpcError) -> set[str]:
    return set(field_violations(error))


def amounts(budget: metrics_pb2.Budget) -> tuple[int, int, int]:
    return budget.spent.amount_micros, budget.reserved.amount_micros, budget.remaining.amount_micros


def log_records(mesh: Mesh, event: str) -> list[dict]:
    records = []
    for line in mesh.services["metrics"].log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            records.append(record)
    return records


async def until(predicate: Callable[[], object], timeout: float = 15.0) -> None:
    """Polls an async or plain predicate until it holds, or fails at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = predicate()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.05)


async def test_concurrent_reservations_fill_the_cap_exactly(start_metrics):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:
        outcomes = await asyncio.gather(*(attempt(stub, f"race-{n}", USD // 10) for n in range(500)))
        granted = [o for o in outcomes if isinstance(o, metrics_pb2.Reservation)]
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert (len(granted), len(refused)) == (100, 400)
        assert {error.code() for error in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        for error in refused:
            assert "budget exhausted for tenant default" in error.details()
            assert "0.00 USD left of 10.00 USD, 0.10 USD asked" in error.details()
        response = await budgets(stub)
        for budget in (response.budget, response.global_budget):
            assert amounts(budget) == (0, CAP, 0)
            assert budget.cap.amount_micros == CAP
            assert (budget.level, budget.used_fraction) == (EXHAUSTED, 1.0)
        assert response.budget.tenant_id == "default"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", response.budget.day)


async def test_two_processes_sharing_the_ledger_never_pass_the_cap_together(start_metrics):
    first = start_metrics()
    second = start_metrics(shared_with=first)
    async with connect_metrics(first) as one, connect_metrics(second) as other:
        outcomes = await asyncio.gather(
            *(attempt((one, other)[n % 2], f"shared-{n}", USD // 10, tenant=f"t{n % 3}") for n in range(400))
        )
        granted = [o for o in outcomes if isinstance(o, metrics_pb2.Reservation)]
        assert len(granted) == 100
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert {error.code() for error in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert len(refused) == 300
        for stub in (one, other):
            assert amounts((await budgets(stub)).global_budget) == (0, CAP, 0)


async def test_mixed_reservations_commits_and_releases_never_pass_the_cap(start_metrics):
    mesh = start_metrics()
    chance = random.Random(5)
    plans = [
        (chance.choice(["commit", "commit-less", "release", "keep"]), chance.random() * 2) for _ in range(400)
    ]
    committed: dict[str, int] = {}
    outstanding: dict[str, int] = {}
    granted = 0
    done = asyncio.Event()
    seen_over_cap: list[tuple[int, int]] = []

    async with connect_metrics(mesh) as stub:

        async def worker(n: int) -> None:
            nonlocal granted
            plan, delay = plans[n]
            await asyncio.sleep(delay)
            key = f"mixed-{n}"
            outcome = await attempt(stub, key, USD // 10, tenant=("acme", "bravo")[n % 2])
            if isinstance(outcome, grpc.aio.AioRpcError):
                assert outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
                return
            granted += 1
            if plan == "commit":
                await commit(stub, key, USD // 10)
                committed[key] = USD // 10
            elif plan == "commit-less":
                await commit(stub, key, USD // 20)
                committed[key] = USD // 20
            elif plan == "release":
                await release(stub, key)
            else:
                outstanding[key] = USD // 10

        async def monitor() -> int:
            looks = 0
            while not done.is_set():
                budget = (await budgets(stub)).global_budget
                spent, reserved, _ = amounts(budget)
                if spent + reserved > CAP:
                    seen_over_cap.append((spent, reserved))
                looks += 1
            return looks

        watching = asyncio.create_task(monitor())
        await asyncio.gather(*(worker(n) for n in range(400)))
        done.set()
        assert await watching >= 3  # it looked while the race ran (a loaded machine looks less often)
        assert seen_over_cap == []
        # Money freed by releases and cheaper commits was reserved again.
        assert granted > 100
        response = await budgets(stub, "acme")
        spent, reserved, remaining = amounts(response.global_budget)
        assert (spent, reserved) == (sum(committed.values()), sum(outstanding.values()))
        assert spent + reserved <= CAP and remaining == CAP - spent - reserved
        bravo = (await budgets(stub, "bravo")).budget
        assert response.budget.spent.amount_micros + bravo.spent.amount_micros == spent
        assert response.budget.reserved.amount_micros + bravo.reserved.amount_micros == reserved


async def test_repeating_a_reservation_never_reserves_twice(start_metrics):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:
        first = await reserve(stub, "once", 2 * USD, job_id="job-1")
        again = await reserve(stub, "once", 2 * USD, job_id="job-1")
        assert again == first
        assert first.tenant_id == "default" and first.amount.amount_micros == 2 * USD
        assert amounts((await budgets(stub)).budget) == (0, 2 * USD, 8 * USD)

        racing = await asyncio.gather(*(reserve(stub, "raced", 3 * USD, job_id="job-2") for _ in range(20)))
        assert all(reservation == racing[0] for reservation in racing)
        assert amounts((await budgets(stub)).budget) == (0, 5 * USD, 5 * USD)

        # The same attempt asked with another amount: the reservation made first stands.
        repeated = await stub.ReserveBudget(reserve_request("once", 3 * USD, job_id="job-1"))
        assert (repeated.reservation, repeated.existing) == (first, True)
        assert amounts((await budgets(stub)).budget) == (0, 5 * USD, 5 * USD)

        # The same key for another tenant or job is refused, and changes nothing.
        for changed in (
            reserve_request("once", 2 * USD, job_id="job-other"),
            reserve_request("once", 2 * USD, tenant="other", job_id="job-1"),
        ):
            error = await failure(stub.ReserveBudget(changed))
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "once" in error.details()
        # Repeating while the budget is full still answers with the reservation.
        await reserve(stub, "rest", 5 * USD)
        assert await reserve(stub, "once", 2 * USD, job_id="job-1") == first
        assert amounts((await budgets(stub)).budget) == (0, CAP, 0)

        # A settled reservation is not made again: a new attempt takes a new key.
        await release(stub, "once")
        error = await failure(stub.ReserveBudget(reserve_request("once", 2 * USD, job_id="job-1")))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert amounts((await budgets(stub)).budget) == (0, 8 * USD, 2 * USD)


async def test_a_reservation_keeps_the_backend_its_attempt_was_reserved_for(start_metrics):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:
        made = await stub.ReserveBudget(reserve_request("job-9:1", 2 * USD, job_id="job-9", backend=RUNWAY))
        assert made.existing is False
        assert (made.reservation.backend, made.reservation.job_id) == (RUNWAY, "job-9")
        assert made.reservation.amount.amount_micros == 2 * USD
        # A router that restarted mid-attempt ranks Veo first now, at another price: the attempt was
        # reserved for Runway, and it is told so.
        again = await stub.ReserveBudget(reserve_request("job-9:1", 3 * USD, job_id="job-9", backend=VEO))
        assert (again.reservation, again.existing) == (made.reservation, True)
        assert amounts((await budgets(stub)).budget) == (0, 2 * USD, 8 * USD)
        # An attempt that names no backend (an older caller) is reserved all the same.
        unnamed = await reserve(stub, "job-10:1", USD, job_id="job-10")
        assert unnamed.backend == backend_pb2.BACKEND_UNSPECIFIED
        await until(
            lambda: [r["backend"] for r in log_records(mesh, "budget reserved")] == ["runway", "unspecified"]
        )


async def test_commit_and_release_settle_a_reservation_once(start_metrics):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:
        await reserve(stub, "spent", 2 * USD, job_id="job-spent")
        await commit(stub, "spent", 3 * USD)  # over the estimate: spend is what it is
        assert amounts((await budgets(stub)).budget) == (3 * USD, 0, 7 * USD)
        await commit(stub, "spent", 3 * USD)  # the same commit again: nothing changes
        assert amounts((await budgets(stub)).budget) == (3 * USD, 0, 7 * USD)
        error = await failure(commit(stub, "spent", USD))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "3.00 USD" in error.details()
        error = await failure(release(stub, "spent"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION

        await reserve(stub, "unspent", 4 * USD)
        assert amounts((await budgets(stub)).budget) == (3 * USD, 4 * USD, 3 * USD)
        await release(stub, "unspent")
        await release(stub, "unspent")  # again: nothing changes
        assert amounts((await budgets(stub)).budget) == (3 * USD, 0, 7 * USD)
        error = await failure(commit(stub, "unspent", USD))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION

        # A free attempt commits zero.
        await reserve(stub, "free", USD)
        await commit(stub, "free", 0)
        assert amounts((await budgets(stub)).budget) == (3 * USD, 0, 7 * USD)

        # The estimate against the actual is logged at commit, once.
        def variance_logged() -> bool:
            return [
                (r["job_id"], r["estimate_micros"], r["actual_micros"], r["variance_ratio"])
                for r in log_records(mesh, "spend committed")
                if r["reservation_key"] == "spent"
            ] == [("job-spent", 2 * USD, 3 * USD, 1.5)]

        await until(variance_logged)


async def test_unknown_keys_are_not_found(start_metrics):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:
        for call in (commit(stub, "never-reserved", USD), release(stub, "never-reserved")):
            error = await failure(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert "never-reserved" in error.details()
            # A key settled longer ago than the ledger keeps one is unknown too: the answer says so.
            assert "(a settled reservation is kept 400 days after it settled)" in error.details()
            info = error_info(error)
            assert (info.reason, dict(info.metadata)) == (
                "RESERVATION_NOT_FOUND",
                {"reservation_key": "never-reserved"},
            )


async def test_bad_input_names_the_field_and_writes_nothing(start_metrics):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:
        cases = [
            (reserve_request("", USD), {"reservation_key"}),
            (reserve_request("k" * 129, USD), {"reservation_key"}),
            (reserve_request("has space", USD), {"reservation_key"}),
            (reserve_request("valid-key", 0), {"amount.amount_micros"}),
            (reserve_request("valid-key", -USD), {"amount.amount_micros"}),
            (metrics_pb2.ReserveBudgetRequest(reservation_key="valid-key"), {"amount"}),
            (
                metrics_pb2.ReserveBudgetRequest(
                    reservation_key="valid-key",
                    amount=money_pb2.Money(currency_code="EUR", amount_micros=USD),
                ),
                {"amount.currency_code"},
            ),
            (reserve_request("valid-key", USD, tenant="no/slashes"), {"tenant_id"}),
            (reserve_request("valid-key", USD, job_id="j" * 129), {"job_id"}),
            (reserve_request("valid-key", USD, backend=99), {"backend"}),
            (reserve_request("bad key", 0), {"reservation_key", "amount.amount_micros"}),
        ]
        for request, fields in cases:
            error = await failure(stub.ReserveBudget(request))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert violated_fields(error) == fields, request
        # Nothing was reserved, under any of those keys.
        assert amounts((await budgets(stub)).global_budget) == (0, 0, CAP)
        assert (await failure(commit(stub, "valid-key", USD))).code() == grpc.StatusCode.NOT_FOUND

        await reserve(stub, "valid-key", USD)
        for request, fields in [
            (metrics_pb2.CommitSpendRequest(reservation_key="valid-key"), {"actual"}),
            (
                metrics_pb2.CommitSpendRequest(reservation_key="valid-key", actual=usd(-1)),
                {"actual.amount_micros"},
            ),
            (
                metrics_pb2.CommitSpendRequest(
                    reservation_key="valid-key", actual=money_pb2.Money(currency_code="EUR", amount_micros=1)
                ),
                {"actual.currency_code"},
            ),
            (metrics_pb2.CommitSpendRequest(reservation_key="", actual=usd(1)), {"reservation_key"}),
        ]:
            error = await failure(stub.CommitSpend(request))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert violated_fields(error) == fields, request
        error = await failure(stub.ReleaseBudget(metrics_pb2.ReleaseBudgetRequest(reservation_key="a b")))
        assert violated_fields(error) == {"reservation_key"}
        error = await failure(stub.GetBudget(metrics_pb2.GetBudgetRequest(tenant_id="a b")))
        assert violated_fields(error) == {"tenant_id"}
        assert amounts((await budgets(stub)).global_budget) == (0, USD, CAP - USD)


async def test_budget_levels_follow_the_thresholds(start_metrics):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:

        async def level() -> tuple[int, float, int]:
            response = await budgets(stub)
            assert (response.global_budget.level, response.global_budget.used_fraction) == (
                response.budget.level,
                response.budget.used_fraction,
            )
            return (
                response.budget.level,
                response.budget.used_fraction,
                response.budget.remaining.amount_micros,
            )

        assert await level() == (OK, 0.0, CAP)
        await reserve(stub, "big", 6_990_000)
        assert await level() == (OK, pytest.approx(0.699), 3_010_000)
        await reserve(stub, "small", 10_000)
        assert await level() == (NOTIFY, pytest.approx(0.70), 3 * USD)
        await commit(stub, "big", 8_990_000)  # cost more than estimated
        assert await level() == (ECONOMY, pytest.approx(0.90), USD)
        await reserve(stub, "last", USD)
        assert await level() == (EXHAUSTED, 1.0, 0)
        error = await failure(reserve(stub, "one-more", 10_000))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "0.00 USD left of 10.00 USD, 0.01 USD asked" in error.details()
        # Spend past the cap is recorded; nothing is left, and the level stays exhausted.
        await commit(stub, "last", 1_500_000)
        assert await level() == (EXHAUSTED, pytest.approx(1.05), 0)
        await release(stub, "small")
        assert await level() == (EXHAUSTED, pytest.approx(1.049), 0)


async def test_a_reservations_answer_carries_the_budgets_with_it_counted_and_each_level_is_warned_once(
    start_metrics,
):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:
        first = await stub.ReserveBudget(reserve_request("first", 6_990_000, tenant="acme"))
        assert (first.budget.tenant_id, first.budget.level) == ("acme", OK)
        assert amounts(first.budget) == (0, 6_990_000, 3_010_000)
        assert amounts(first.global_budget) == (0, 6_990_000, 3_010_000)
        # As GetBudget would tell it, without asking.
        assert first.budget == (await budgets(stub, "acme")).budget
        notify = await stub.ReserveBudget(reserve_request("second", 10_000, tenant="acme"))
        assert (notify.budget.level, notify.budget.used_fraction) == (NOTIFY, pytest.approx(0.70))
        # Repeated, the reservation is not counted twice.
        again = await stub.ReserveBudget(reserve_request("second", 10_000, tenant="acme"))
        assert again.existing and amounts(again.budget) == amounts(notify.budget)
        await reserve(stub, "third", 10_000, tenant="acme")
        economy = await stub.ReserveBudget(reserve_request("fourth", 2 * USD, tenant="acme"))
        assert economy.global_budget.level == ECONOMY
    # The 70% action: operators are told once per budget and level reached, not at every reservation.
    await until(lambda: len(log_records(mesh, "budget level reached")) == 4)
    told = {
        (record["tenant_id"], record["budget_level"]) for record in log_records(mesh, "budget level reached")
    }
    assert told == {("acme", "notify"), ("", "notify"), ("acme", "economy"), ("", "economy")}


async def test_a_tenant_cap_bounds_each_tenant_under_the_global_cap(start_metrics):
    mesh = start_metrics(AIPROD_METRICS_TENANT_DAILY_CAP_USD="4")
    async with connect_metrics(mesh) as stub:
        await reserve(stub, "acme-1", 4 * USD, tenant="acme")
        error = await failure(reserve(stub, "acme-2", USD // 2, tenant="acme"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            "tenant acme" in error.details()
            and "0.00 USD left of 4.00 USD, 0.50 USD asked" in error.details()
        )
        await reserve(stub, "bravo-1", 4 * USD, tenant="bravo")
        await reserve(stub, "carol-1", USD, tenant="carol")
        error = await failure(reserve(stub, "carol-2", 2 * USD, tenant="carol"))
        assert (
            "all tenants" in error.details()
            and "1.00 USD left of 10.00 USD, 2.00 USD asked" in error.details()
        )
        response = await budgets(stub, "carol")
        assert (response.budget.tenant_id, response.budget.cap.amount_micros) == ("carol", 4 * USD)
        assert amounts(response.budget) == (0, USD, 3 * USD)
        assert amounts(response.global_budget) == (0, 9 * USD, USD)


async def test_a_budget_refusal_carries_error_info_with_the_amounts(start_metrics):
    """A caller (the router) branches on the ErrorInfo's reason and reads the amounts from its metadata,
    never from the status text."""
    mesh = start_metrics(AIPROD_METRICS_TENANT_DAILY_CAP_USD="4")
    async with connect_metrics(mesh) as stub:
        await reserve(stub, "acme-1", 3 * USD, tenant="acme")
        error = await failure(reserve(stub, "acme-2", 2 * USD, tenant="acme"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(error)
        assert info.reason == "BUDGET_EXHAUSTED"
        metadata = dict(info.metadata)
        assert metadata.pop("day") == (await budgets(stub, "acme")).budget.day
        assert metadata == {
            "scope": "tenant",
            "tenant_id": "acme",
            "remaining_micros": str(USD),
            "asked_micros": str(2 * USD),
            "cap_micros": str(4 * USD),
        }
        await reserve(stub, "bravo-1", 4 * USD, tenant="bravo")
        error = await failure(reserve(stub, "carol-1", 4 * USD, tenant="carol"))
        metadata = dict(error_info(error).metadata)
        assert (metadata["scope"], metadata["tenant_id"]) == ("global", "")
        assert (metadata["remaining_micros"], metadata["asked_micros"], metadata["cap_micros"]) == (
            str(3 * USD),
            str(4 * USD),
            str(CAP),
        )


async def test_a_stuck_reservation_expires_counted_as_spent_until_reconciled(start_metrics):
    mesh = start_metrics(
        AIPROD_METRICS_RESERVATION_TTL_SECONDS="1", AIPROD_METRICS_EXPIRY_SWEEP_SECONDS="0.2"
    )
    async with connect_metrics(mesh) as stub:
        before = datetime.now(UTC)
        reservation = await reserve(stub, "stuck", 4 * USD, job_id="job-stuck")
        after = datetime.now(UTC)
        await reserve(stub, "lost", 2 * USD, job_id="job-lost")
        expires = reservation.expire_time.ToDatetime(tzinfo=UTC)
        assert before + timedelta(seconds=1) <= expires <= after + timedelta(seconds=1)

        async def expired() -> bool:
            return (await budgets(stub)).budget.expired_reservations == 2

        await until(expired)
        # Expiry frees nothing: those attempts may have been billed, so they are spent at worst case.
        response = await budgets(stub)
        for budget in (response.budget, response.global_budget):
            assert amounts(budget) == (6 * USD, 0, 4 * USD)
            assert (budget.uncertain.amount_micros, budget.expired_reservations) == (6 * USD, 2)
        error = await failure(reserve(stub, "next", 5 * USD))  # fits only if expiry freed money
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4.00 USD left" in error.details()
        await until(
            lambda: (
                sorted(r["job_id"] for r in log_records(mesh, "reservation expired"))
                == ["job-lost", "job-stuck"]
            )
        )
        # The attempt asked again is still that attempt.
        repeated = await stub.ReserveBudget(reserve_request("stuck", 4 * USD, job_id="job-stuck"))
        assert (repeated.reservation, repeated.existing) == (reservation, True)

        # The stuck job finished after all: the actual replaces the worst case, late.
        await commit(stub, "stuck", 3 * USD)
        response = await budgets(stub)
        assert amounts(response.budget) == (5 * USD, 0, 5 * USD)
        assert response.budget.uncertain.amount_micros == 2 * USD
        await until(lambda: [r["after_expiry"] for r in log_records(mesh, "spend committed")] == [True])
        # The lost one is known not to have billed: its money is free again.
        await release(stub, "lost")
        response = await budgets(stub)
        assert amounts(response.budget) == (3 * USD, 0, 7 * USD)
        assert (response.budget.uncertain.amount_micros, response.budget.expired_reservations) == (0, 2)


async def test_the_ledger_survives_a_killed_service(start_metrics):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:
        kept = await reserve(stub, "kept", 2 * USD)
        await reserve(stub, "spent", 3 * USD)
        await commit(stub, "spent", 2_500_000)
        before = await budgets(stub)
    mesh.kill("metrics")
    mesh.start_service("metrics")
    async with connect_metrics(mesh) as stub:
        after = await budgets(stub)
        assert after == before
        assert amounts(after.budget) == (2_500_000, 2 * USD, 5_500_000)
        assert await reserve(stub, "kept", 2 * USD) == kept
        await commit(stub, "kept", USD)
        assert amounts((await budgets(stub)).budget) == (3_500_000, 0, 6_500_000)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AIPROD_METRICS_BUDGET_TIME_ZONE", "Mars/Olympus_Mons"),
        ("AIPROD_METRICS_ECONOMY_THRESHOLD", "0.5"),
        ("AIPROD_METRICS_DAILY_CAP_USD", "-1"),
    ],
)
def test_a_wrong_ledger_setting_stops_the_service_naming_it(start_metrics, variable, value):
    with pytest.raises(ServiceStartError) as stopped:
        start_metrics(**{variable: value})
    assert variable in str(stopped.value)


# Tenants' own caps and spend over days ----------------------------------------------------------------


async def set_cap(stub, tenant: str, micros: int | None) -> metrics_pb2.Budget:
    request = metrics_pb2.SetTenantBudgetRequest(tenant_id=tenant)
    if micros is not None:
        request.daily_cap.CopyFrom(usd(micros))
    return (await stub.SetTenantBudget(request)).budget


async def test_a_tenants_own_cap_bounds_it_reports_its_level_and_survives_a_restart(start_metrics):
    mesh = start_metrics(AIPROD_METRICS_TENANT_DAILY_CAP_USD="2")
    async with connect_metrics(mesh) as stub:
        budget = await set_cap(stub, "acme", 5 * USD)
        assert (budget.tenant_id, budget.cap.amount_micros, budget.remaining.amount_micros) == (
            "acme",
            5 * USD,
            5 * USD,
        )
        await reserve(stub, "acme-1", 4 * USD, tenant="acme")  # over the default 2 USD: its own cap holds
        response = await budgets(stub, "acme")
        assert amounts(response.budget) == (0, 4 * USD, USD)
        assert (response.budget.level, response.budget.used_fraction) == (NOTIFY, pytest.approx(0.8))
        error = await failure(reserve(stub, "acme-2", 2 * USD, tenant="acme"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(error).metadata["cap_micros"] == str(5 * USD)
        # A tenant without its own keeps the default.
        assert (await budgets(stub, "bravo")).budget.cap.amount_micros == 2 * USD
        error = await failure(reserve(stub, "bravo-1", 3 * USD, tenant="bravo"))
        assert error_info(error).metadata["scope"] == "tenant"
        # Zero: no cap of its own, only everyone's (10 USD, 4 of them reserved by acme).
        budget = await set_cap(stub, "bravo", 0)
        assert (budget.cap.amount_micros, budget.remaining.amount_micros, budget.level) == (0, 0, OK)
        await reserve(stub, "bravo-1", 3 * USD, tenant="bravo")
        error = await failure(reserve(stub, "bravo-2", 4 * USD, tenant="bravo"))
        assert error_info(error).metadata["scope"] == "global"
        # Lowered under what it reserved: exhausted.
        budget = await set_cap(stub, "acme", 3 * USD)
        assert (budget.level, budget.remaining.amount_micros) == (EXHAUSTED, 0)
    mesh.kill("metrics")
    mesh.start_service("metrics")
    async with connect_metrics(mesh) as stub:
        assert (await budgets(stub, "acme")).budget.cap.amount_micros == 3 * USD
        assert (await budgets(stub, "bravo")).budget.cap.amount_micros == 0
        # Without a cap in the request: the tenant's own is forgotten, the default applies again.
        assert (await set_cap(stub, "acme", None)).cap.amount_micros == 2 * USD
        assert (await budgets(stub, "acme")).budget.level == EXHAUSTED


async def test_spend_over_days_sums_committed_uncertain_and_reserved_money(start_metrics):
    mesh = start_metrics()
    async with connect_metrics(mesh) as stub:
        day = (await budgets(stub, "acme")).budget.day
        await reserve(stub, "acme-1", 2 * USD, tenant="acme")
        await commit(stub, "acme-1", 1_500_000)
        await reserve(stub, "acme-2", USD, tenant="acme")
        await reserve(stub, "acme-3", USD, tenant="acme")
        await release(stub, "acme-3")
        await reserve(stub, "bravo-1", 3 * USD, tenant="bravo")
        await commit(stub, "bravo-1", 3 * USD)

        async def spend(tenant: str, first: str, last: str) -> tuple[int, int]:
            request = metrics_pb2.GetSpendRequest(tenant_id=tenant, first_day=first, last_day=last)
            response = await stub.GetSpend(request)
            return response.spent.amount_micros, response.reserved.amount_micros

        today = datetime.fromisoformat(day).date()
        week_ago = (today - timedelta(days=7)).isoformat()
        assert await spend("acme", day, day) == (1_500_000, USD)
        assert await spend("acme", week_ago, day) == (1_500_000, USD)
        assert await spend("bravo", day, day) == (3 * USD, 0)
        assert await spend("acme", week_ago, (today - timedelta(days=1)).isoformat()) == (0, 0)
        # The range's spend is today's budget's, as GetBudget counts it.
        budget = (await budgets(stub, "acme")).budget
        assert await spend("acme", day, day) == (budget.spent.amount_micros, budget.reserved.amount_micros)

        year_later = (today + timedelta(days=366)).isoformat()
        assert await spend("acme", day, year_later) == (1_500_000, USD)
        for request, fields in [
            (metrics_pb2.GetSpendRequest(first_day=day), {"last_day"}),
            (metrics_pb2.GetSpendRequest(last_day=day), {"first_day"}),
            (metrics_pb2.GetSpendRequest(first_day="2025-02-30", last_day=day), {"first_day"}),
            (
                metrics_pb2.GetSpendRequest(first_day="yesterday", last_day="2025/06/01"),
                {"first_day", "last_day"},
            ),
            (metrics_pb2.GetSpendRequest(first_day=day, last_day=week_ago), {"last_day"}),
            (
                metrics_pb2.GetSpendRequest(
                    first_day=day, last_day=(today + timedelta(days=367)).isoformat()
                ),
                {"last_day"},
            ),
            (metrics_pb2.GetSpendRequest(tenant_id="a b", first_day=day, last_day=day), {"tenant_id"}),
        ]:
            error = await failure(stub.GetSpend(request))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert violated_fields(error) == fields, request
        for request, fields in [
            (metrics_pb2.SetTenantBudgetRequest(tenant_id="no/slash", daily_cap=usd(USD)), {"tenant_id"}),
            (
                metrics_pb2.SetTenantBudgetRequest(tenant_id="acme", daily_cap=usd(-1)),
                {"daily_cap.amount_micros"},
            ),
            (
                metrics_pb2.SetTenantBudgetRequest(
                    tenant_id="acme", daily_cap=money_pb2.Money(currency_code="EUR", amount_micros=USD)
                ),
                {"daily_cap.currency_code"},
            ),
        ]:
            error = await failure(stub.SetTenantBudget(request))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert violated_fields(error) == fields, request
        assert (await budgets(stub, "acme")).budget.cap.amount_micros == CAP  # nothing was written
