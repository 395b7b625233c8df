"""MetricsService: job counts per backend and state, and the spend ledger (reservations and budgets).

The ledger's API, on top of the store's semantics (see `aiprod_metrics.ledger`):

- ReserveBudget reserves an attempt's worst-case cost against today's budgets, for the backend the
  attempt will render at, idempotently per reservation key: a repeat with the same tenant and job
  returns the reservation made first (its amount, backend and expire_time, `existing` set), whatever
  amount or backend it asks, while that reservation is open or expired, and reserves nothing more:
  the caller keeps the attempt at that backend. ALREADY_EXISTS when the key was used with another
  tenant or job; FAILED_PRECONDITION when that reservation was committed or released (one key per
  attempt). RESOURCE_EXHAUSTED, naming what is left, when spent + reserved + amount would pass the
  tenant's or the global cap of the day.
- CommitSpend records what the attempt really cost (more than the estimate too: spend is what it is).
  Committing again with the same actual is OK; with another actual FAILED_PRECONDITION. A reservation
  that expired unsettled can still be committed: its worst case gives way to the actual (even over the
  cap), logged as late. A released one cannot (FAILED_PRECONDITION): its owner said nothing was billed.
- ReleaseBudget frees an open (or expired: known not to have billed after all) reservation unspent;
  releasing again is OK; a committed one FAILED_PRECONDITION.
- Expiry frees nothing: an expired reservation is spent at its full amount until reconciled by a late
  commit or release, and reported as the budget's uncertain money meanwhile.
- Unknown keys are NOT_FOUND (a reservation settled longer ago than the ledger's retention is
  deleted: its key is unknown again, its day's money stays); bad input INVALID_ARGUMENT naming each
  field, with nothing written (`aiprod_kit.checks`: no NaN, no enum value this build does not know, no
  time outside protobuf's range, no overlong string). Errors quote a caller's key by a short prefix
  (`echo`).
- GetBudget reports today's budget of the tenant and of everyone together.
- SetTenantBudget records a tenant's own daily cap in the ledger's database (shared by every replica):
  ReserveBudget, GetBudget and the budget levels use it for that tenant from then on. Zero means no
  cap of its own (only everyone's); a request without daily_cap forgets the tenant's own cap, so that
  the configured default tenant cap (AIPROD_METRICS_TENANT_DAILY_CAP_USD) applies to it again, as it
  does to every tenant that never had one.
- GetSpend sums a tenant's money over a range of days (first_day..last_day, "YYYY-MM-DD" in the
  ledger's time zone, both included, at most 366 days apart) as each day's budget counts it: spent
  (committed, uncertain money included) and reserved.

RecordJobEvent also keeps terminal jobs and backend errors for the alert policies (ListAlerts, see
`aiprod_metrics.alerts`) and the SLOs (GetSloReport, see `aiprod_metrics.slo`). A batch with one bad
event records none of it.
"""

import asyncio
import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
import structlog
from google.protobuf import timestamp_pb2

from aiprod.common.v1 import backend_pb2, job_pb2, money_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_kit.capabilities import backend_name
from aiprod_kit.checks import (
    Violation,
    bounded_string,
    echo,
    finite_number,
    known_enum,
    valid_duration,
    valid_timestamp,
)
from aiprod_kit.errors import (
    AlreadyExists,
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from aiprod_kit.failures import reason_name
from aiprod_kit.money import MICROS_PER_UNIT, budget_level_name, usd
from aiprod_kit.retention import duration
from aiprod_kit.settings import ConfigurationError, MetricsSettings
from aiprod_metrics.alerts import AlertEvaluator
from aiprod_metrics.events import BackendError, EventStore, JobOutcome
from aiprod_metrics.ledger import (
    BudgetExceeded,
    Caps,
    KeyConflict,
    LedgerStore,
    Reservation,
    State,
    Totals,
    UnknownKey,
    WrongState,
)
from aiprod_metrics.slo import SloPolicy, slo_report
from aiprod_metrics.telemetry import MetricsTelemetry

log = structlog.get_logger()

_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_NAME_RULE = "must be 1 to 128 characters among A-Z a-z 0-9 . _ : -"
# One attempt's cost at most, a sanity bound that also keeps a day's sums far from int64's limit.
MAX_AMOUNT_MICROS = 1_000_000 * MICROS_PER_UNIT
MAX_JOB_ID_LENGTH = 128
MAX_PRESET_LENGTH = 128
# A tenant's daily cap at most (like AIPROD_METRICS_DAILY_CAP_USD's bound).
MAX_CAP_MICROS = 1_000_000_000 * MICROS_PER_UNIT
# The longest range GetSpend sums: last_day at most this many days after first_day.
MAX_SPEND_RANGE_DAYS = 366
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class BudgetPolicy:
    """The ledger's settings, checked: caps in micro-USD (0: none), thresholds, expiry."""

    global_cap: int
    tenant_cap: int
    default_tenant: str
    time_zone: tzinfo
    notify_threshold: float
    economy_threshold: float
    reservation_ttl: timedelta
    expiry_sweep_seconds: float
    # How long a settled reservation is kept once it settled (0: forever); its day's money stays.
    ledger_retention_seconds: float = 0.0

    @classmethod
    def from_settings(cls, settings: MetricsSettings) -> "BudgetPolicy":
        global_cap = round(settings.metrics_daily_cap_usd * MICROS_PER_UNIT)
        tenant_cap = round(settings.metrics_tenant_daily_cap_usd * MICROS_PER_UNIT)
        if not _NAME.fullmatch(settings.metrics_default_tenant):
            raise ConfigurationError(f"AIPROD_METRICS_DEFAULT_TENANT: {_NAME_RULE}")
        return cls(
            global_cap=global_cap,
            tenant_cap=tenant_cap or global_cap,
            default_tenant=settings.metrics_default_tenant,
            time_zone=time_zone(settings.metrics_budget_time_zone),
            notify_threshold=settings.metrics_notify_threshold,
            economy_threshold=settings.metrics_economy_threshold,
            reservation_ttl=timedelta(seconds=settings.metrics_reservation_ttl_seconds),
            expiry_sweep_seconds=settings.metrics_expiry_sweep_seconds,
            ledger_retention_seconds=settings.ledger_retention_seconds,
        )

    @property
    def caps(self) -> Caps:
        """The caps a reservation must fit under: the default tenant cap, which the ledger replaces
        with a tenant's own cap when it has one."""
        return Caps(tenant=self.tenant_cap, everyone=self.global_cap)

    def tenant_cap_of(self, own: int | None) -> int:
        """A tenant's cap: its own (0: none, only everyone's), else the default tenant cap."""
        return self.tenant_cap if own is None else own

    def level(self, used_fraction: float, cap: int) -> int:
        if cap <= 0:
            return metrics_pb2.BUDGET_LEVEL_OK
        if used_fraction >= 1.0:
            return metrics_pb2.BUDGET_LEVEL_EXHAUSTED
        if used_fraction >= self.economy_threshold:
            return metrics_pb2.BUDGET_LEVEL_ECONOMY
        if used_fraction >= self.notify_threshold:
            return metrics_pb2.BUDGET_LEVEL_NOTIFY
        return metrics_pb2.BUDGET_LEVEL_OK


def time_zone(name: str) -> tzinfo:
    if name == "UTC":  # needs no time zone database
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ConfigurationError(
            f"AIPROD_METRICS_BUDGET_TIME_ZONE: {name!r} is not a known IANA time zone"
        ) from error


def format_usd(micros: int) -> str:
    """An amount as "0.42 USD", exact to the micro-dollar when cents are not enough."""
    amount = Decimal(micros) / MICROS_PER_UNIT
    text = f"{amount:.2f}" if micros % 10_000 == 0 else f"{amount:.6f}".rstrip("0")
    return f"{text} USD"


def _validate_money(
    field: str, money: money_pb2.Money, positive: bool, bound: int = MAX_AMOUNT_MICROS
) -> list[tuple[str, str]]:
    violations = []
    if money.currency_code not in ("", "USD"):
        violations.append((f"{field}.currency_code", "must be USD (or empty, meaning USD)"))
    if positive and money.amount_micros <= 0:
        violations.append((f"{field}.amount_micros", "must be positive"))
    elif money.amount_micros < 0:
        violations.append((f"{field}.amount_micros", "must not be negative"))
    elif money.amount_micros > bound:
        violations.append((f"{field}.amount_micros", f"must be at most {format_usd(bound)}"))
    return violations


def _validate_key(key: str) -> list[tuple[str, str]]:
    return [] if _NAME.fullmatch(key) else [("reservation_key", _NAME_RULE)]


def _parse_day(field: str, value: str) -> tuple[date | None, list[tuple[str, str]]]:
    """A "YYYY-MM-DD" day, or the violation that names the field."""
    if not value:
        return None, [(field, 'is required: a day, "YYYY-MM-DD"')]
    try:
        if not _DAY.fullmatch(value):
            raise ValueError(value)
        return date.fromisoformat(value), []
    except ValueError:
        return None, [(field, f'{echo(value, 32)} is not a day, "YYYY-MM-DD"')]


def _event_violations(event: metrics_pb2.JobEventRecord, field: str) -> list[Violation]:
    """What is wrong with one job event. A failure reason this build does not know is kept (as its
    number, see `aiprod_kit.failures.reason_name`): a newer peer's, which must not hold up the batch."""
    violations = known_enum(event.state, job_pb2.JobState, f"{field}.state", allow_unspecified=False)
    violations += known_enum(event.backend, backend_pb2.Backend, f"{field}.backend")
    violations += bounded_string(event.job_id, f"{field}.job_id", MAX_JOB_ID_LENGTH)
    violations += bounded_string(event.preset, f"{field}.preset", MAX_PRESET_LENGTH)
    if event.HasField("time"):
        violations += valid_timestamp(event.time, f"{field}.time")
    violations += finite_number(event.qc_score, f"{field}.qc_score", 0, 1)
    if event.HasField("job_duration"):
        violations += valid_duration(event.job_duration, f"{field}.job_duration")
    if event.HasField("cost"):
        violations += _validate_money(f"{field}.cost", event.cost, positive=False)
    return violations


def _timestamp(reservation: Reservation) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(reservation.expires)
    return stamp


class MetricsServicer(metrics_pb2_grpc.MetricsServiceServicer):
    def __init__(
        self,
        ledger: LedgerStore,
        policy: BudgetPolicy,
        events: EventStore,
        alerts: AlertEvaluator,
        slo: SloPolicy,
        telemetry: MetricsTelemetry | None = None,
    ) -> None:
        self._telemetry = telemetry or MetricsTelemetry()
        self._job_counts: Counter[tuple[int, int]] = Counter()
        self._ledger = ledger
        self._policy = policy
        # What a NOT_FOUND adds: a key settled longer ago than the retention was forgotten (the
        # gateway settles each charge once; only a retry that late meets this, and stops).
        self._not_kept = (
            f" (a settled reservation is kept {duration(policy.ledger_retention_seconds)} after it settled)"
            if policy.ledger_retention_seconds
            else ""
        )
        self._events = events
        self._alerts = alerts
        self._slo = slo
        # Per budget (its tenant; "" for everyone's): the day and level last warned about.
        self._levels_told: dict[str, tuple[str, int]] = {}

    async def RecordJobEvent(
        self, request: metrics_pb2.RecordJobEventRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.RecordJobEventResponse:
        violations = [
            violation
            for index, event in enumerate(request.events)
            for violation in _event_violations(event, f"events[{index}]")
        ]
        if violations:
            raise InvalidArgument(violations)
        await self._events.record(*_outcomes_and_errors(request.events))
        for event in request.events:
            self._job_counts[(event.backend, event.state)] += 1
        return metrics_pb2.RecordJobEventResponse()

    async def GetJobStats(
        self, request: metrics_pb2.GetJobStatsRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.GetJobStatsResponse:
        return metrics_pb2.GetJobStatsResponse(
            stats=[
                metrics_pb2.JobStat(backend=backend, state=state, count=count)
                for (backend, state), count in sorted(self._job_counts.items())
            ]
        )

    # The ledger ---------------------------------------------------------------------------------

    def _tenant(self, tenant_id: str) -> tuple[str, list[tuple[str, str]]]:
        if not tenant_id:
            return self._policy.default_tenant, []
        return tenant_id, [] if _NAME.fullmatch(tenant_id) else [("tenant_id", _NAME_RULE)]

    async def ReserveBudget(
        self, request: metrics_pb2.ReserveBudgetRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.ReserveBudgetResponse:
        key = request.reservation_key
        tenant, violations = self._tenant(request.tenant_id)
        violations = _validate_key(key) + violations
        if not request.HasField("amount"):
            violations.append(("amount", "is required: the attempt's worst-case cost"))
        else:
            violations += _validate_money("amount", request.amount, positive=True)
        violations += bounded_string(request.job_id, "job_id", MAX_JOB_ID_LENGTH)
        violations += known_enum(request.backend, backend_pb2.Backend, "backend")
        if violations:
            raise InvalidArgument(violations)
        amount = request.amount.amount_micros
        try:
            reservation, fresh = await self._ledger.reserve(
                key,
                tenant,
                request.job_id,
                amount,
                self._policy.caps,
                self._policy.reservation_ttl,
                request.backend,
            )
        except BudgetExceeded as refusal:
            self._telemetry.reservation("refused")
            scope = f"tenant {refusal.tenant}" if refusal.tenant is not None else "all tenants"
            log.info(
                "reservation refused",
                reservation_key=key,
                tenant=tenant,
                job_id=request.job_id,
                cap_scope="tenant" if refusal.tenant is not None else "global",
                amount_micros=amount,
                remaining_micros=refusal.remaining,
            )
            raise ResourceExhausted(
                f"budget exhausted for {scope} on {refusal.day}: {format_usd(refusal.remaining)} left of "
                f"{format_usd(refusal.cap)}, {format_usd(refusal.asked)} asked",
                reason=ErrorReason.BUDGET_EXHAUSTED,
                metadata={
                    "scope": "tenant" if refusal.tenant is not None else "global",
                    "tenant_id": refusal.tenant if refusal.tenant is not None else "",
                    "day": refusal.day,
                    "remaining_micros": refusal.remaining,
                    "asked_micros": refusal.asked,
                    "cap_micros": refusal.cap,
                },
            ) from refusal
        except KeyConflict as conflict:
            existing = conflict.existing
            raise AlreadyExists(
                f"reservation_key {echo(key)} was already used for another reservation (tenant {existing.tenant}, "
                f"job {existing.job_id or '-'})",
                reason=ErrorReason.RESERVATION_KEY_CONFLICT,
                metadata={"reservation_key": key},
            ) from conflict
        except WrongState as wrong:
            raise FailedPrecondition(
                f"reservation {echo(key)} is {wrong.reservation.state} already; use a new key for a new attempt",
                reason=ErrorReason.RESERVATION_SETTLED,
                metadata={"reservation_key": key, "state": str(wrong.reservation.state)},
            ) from wrong
        if fresh:
            self._telemetry.reservation("reserved")
            log.info(
                "budget reserved",
                reservation_key=key,
                tenant=tenant,
                job_id=request.job_id,
                amount_micros=amount,
                backend=backend_name(reservation.backend),
                day=reservation.day,
            )
        elif (reservation.amount, reservation.backend) != (amount, request.backend):
            # A caller that restarted mid-attempt, with a new estimate or ranking: it keeps to the first.
            log.info(
                "reservation repeated with other terms; the reserved ones stand",
                reservation_key=key,
                tenant=tenant,
                job_id=request.job_id,
                amount_micros=reservation.amount,
                asked_amount_micros=amount,
                backend=backend_name(reservation.backend),
                asked_backend=backend_name(request.backend),
                state=str(reservation.state),
            )
        budgets = await self._budgets(tenant)
        return metrics_pb2.ReserveBudgetResponse(
            budget=budgets.budget,
            global_budget=budgets.global_budget,
            reservation=metrics_pb2.Reservation(
                reservation_key=reservation.key,
                tenant_id=reservation.tenant,
                amount=usd(reservation.amount),
                expire_time=_timestamp(reservation),
                backend=reservation.backend,
                job_id=reservation.job_id,
            ),
            existing=not fresh,
        )

    async def CommitSpend(
        self, request: metrics_pb2.CommitSpendRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.CommitSpendResponse:
        key = request.reservation_key
        violations = _validate_key(key)
        if not request.HasField("actual"):
            violations.append(("actual", "is required: what the attempt really cost (zero included)"))
        else:
            violations += _validate_money("actual", request.actual, positive=False)
        if violations:
            raise InvalidArgument(violations)
        actual = request.actual.amount_micros
        try:
            reservation, before = await self._ledger.commit(key, actual)
        except UnknownKey as error:
            raise NotFound(
                f"no reservation has the key {echo(key)}{self._not_kept}",
                reason=ErrorReason.RESERVATION_NOT_FOUND,
                metadata={"reservation_key": key},
            ) from error
        except WrongState as wrong:
            recorded = wrong.reservation
            if recorded.state == State.COMMITTED:
                raise FailedPrecondition(
                    f"reservation {echo(key)} was committed already with {format_usd(recorded.actual or 0)}, "
                    f"not {format_usd(actual)}",
                    reason=ErrorReason.RESERVATION_SETTLED,
                    metadata={"reservation_key": key, "state": str(recorded.state)},
                ) from wrong
            raise FailedPrecondition(
                f"reservation {echo(key)} was {recorded.state}: nothing may be committed against it",
                reason=ErrorReason.RESERVATION_SETTLED,
                metadata={"reservation_key": key, "state": str(recorded.state)},
            ) from wrong
        if before != State.COMMITTED:
            self._telemetry.committed(reservation.variance_ratio)
            (log.warning if before == State.EXPIRED else log.info)(
                "spend committed",
                reservation_key=key,
                tenant=reservation.tenant,
                job_id=reservation.job_id,
                day=reservation.day,
                estimate_micros=reservation.amount,
                actual_micros=actual,
                variance_ratio=reservation.variance_ratio,
                after_expiry=before == State.EXPIRED,
            )
        return metrics_pb2.CommitSpendResponse()

    async def ReleaseBudget(
        self, request: metrics_pb2.ReleaseBudgetRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.ReleaseBudgetResponse:
        key = request.reservation_key
        violations = _validate_key(key)
        if violations:
            raise InvalidArgument(violations)
        try:
            reservation, before = await self._ledger.release(key)
        except UnknownKey as error:
            raise NotFound(
                f"no reservation has the key {echo(key)}{self._not_kept}",
                reason=ErrorReason.RESERVATION_NOT_FOUND,
                metadata={"reservation_key": key},
            ) from error
        except WrongState as wrong:
            raise FailedPrecondition(
                f"reservation {echo(key)} was committed already ({format_usd(wrong.reservation.actual or 0)}): "
                "spent money cannot be released",
                reason=ErrorReason.RESERVATION_SETTLED,
                metadata={"reservation_key": key, "state": str(wrong.reservation.state)},
            ) from wrong
        if before != State.RELEASED:
            self._telemetry.reservation("released")
            log.info(
                "budget released",
                reservation_key=key,
                tenant=reservation.tenant,
                job_id=reservation.job_id,
                amount_micros=reservation.amount,
            )
        return metrics_pb2.ReleaseBudgetResponse()

    async def GetBudget(
        self, request: metrics_pb2.GetBudgetRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.GetBudgetResponse:
        tenant, violations = self._tenant(request.tenant_id)
        if violations:
            raise InvalidArgument(violations)
        return await self._budgets(tenant)

    async def SetTenantBudget(
        self, request: metrics_pb2.SetTenantBudgetRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.SetTenantBudgetResponse:
        tenant, violations = self._tenant(request.tenant_id)
        if request.HasField("daily_cap"):
            violations += _validate_money(
                "daily_cap", request.daily_cap, positive=False, bound=MAX_CAP_MICROS
            )
        if violations:
            raise InvalidArgument(violations)
        if request.HasField("daily_cap"):
            cap = request.daily_cap.amount_micros
            await self._ledger.set_tenant_cap(tenant, cap)
            log.info("tenant cap set", tenant=tenant, cap_micros=cap, own_cap=cap > 0)
        else:
            await self._ledger.clear_tenant_cap(tenant)
            log.info(
                "tenant cap cleared: the default applies", tenant=tenant, cap_micros=self._policy.tenant_cap
            )
        return metrics_pb2.SetTenantBudgetResponse(budget=(await self._budgets(tenant)).budget)

    async def GetSpend(
        self, request: metrics_pb2.GetSpendRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.GetSpendResponse:
        tenant, violations = self._tenant(request.tenant_id)
        first, first_violations = _parse_day("first_day", request.first_day)
        last, last_violations = _parse_day("last_day", request.last_day)
        violations += first_violations + last_violations
        if first is not None and last is not None:
            if last < first:
                violations.append(("last_day", f"must not be before first_day ({first.isoformat()})"))
            elif (last - first).days > MAX_SPEND_RANGE_DAYS:
                violations.append(
                    (
                        "last_day",
                        f"must be at most {MAX_SPEND_RANGE_DAYS} days after first_day ({first.isoformat()})",
                    )
                )
        if violations:
            raise InvalidArgument(violations)
        assert first is not None and last is not None
        spend = await self._ledger.spend(tenant, first.isoformat(), last.isoformat())
        return metrics_pb2.GetSpendResponse(spent=usd(spend.spent), reserved=usd(spend.reserved))

    async def _budgets(self, tenant: str) -> metrics_pb2.GetBudgetResponse:
        """The tenant's and everyone's budget of today; each read also refreshes the budget gauges and
        warns of a level newly reached."""
        totals = await self._ledger.day_totals(tenant)
        tenant_cap = self._policy.tenant_cap_of(totals.tenant_cap)
        response = metrics_pb2.GetBudgetResponse(
            budget=self._budget(tenant, totals.day, tenant_cap, totals.tenant),
            global_budget=self._budget("", totals.day, self._policy.global_cap, totals.everyone),
        )
        self._telemetry.budget_read(totals.everyone, self._policy.global_cap, response.global_budget.level)
        self._tell_level_reached(response)
        return response

    def _tell_level_reached(self, budgets: metrics_pb2.GetBudgetResponse) -> None:
        """Logs a warning the first time a budget is seen at a level from notify on (the 70% action
        tells operators), and at each higher level after it, once per budget and day."""
        for budget in (budgets.budget, budgets.global_budget):
            if budget.level < metrics_pb2.BUDGET_LEVEL_NOTIFY:
                continue
            if self._levels_told.get(budget.tenant_id, ("", 0)) >= (budget.day, budget.level):
                continue
            self._levels_told[budget.tenant_id] = (budget.day, budget.level)
            log.warning(
                "budget level reached",
                tenant_id=budget.tenant_id,
                day=budget.day,
                budget_level=budget_level_name(budget.level),
                used=f"{budget.used_fraction:.0%}",
            )

    def _budget(self, tenant: str, day: str, cap: int, totals: Totals) -> metrics_pb2.Budget:
        used = totals.spent + totals.reserved
        used_fraction = used / cap if cap > 0 else 0.0
        return metrics_pb2.Budget(
            tenant_id=tenant,
            day=day,
            cap=usd(cap),
            spent=usd(totals.spent),
            reserved=usd(totals.reserved),
            remaining=usd(max(cap - used, 0) if cap > 0 else 0),
            level=self._policy.level(used_fraction, cap),
            used_fraction=used_fraction,
            expired_reservations=totals.expired,
            uncertain=usd(totals.uncertain),
        )

    # Alerts and SLOs -------------------------------------------------------------------------

    async def ListAlerts(
        self, request: metrics_pb2.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.ListAlertsResponse:
        return metrics_pb2.ListAlertsResponse(alerts=await self._evaluate_alerts())

    async def _evaluate_alerts(self) -> list[metrics_pb2.Alert]:
        alerts = await self._alerts.evaluate()
        self._telemetry.alerts_evaluated(alerts)
        return alerts

    async def GetSloReport(
        self, request: metrics_pb2.GetSloReportRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.GetSloReportResponse:
        return metrics_pb2.GetSloReportResponse(slos=await self._slo_report())

    async def _slo_report(self) -> list[metrics_pb2.SloStatus]:
        slos = await slo_report(self._events, self._slo)
        self._telemetry.slos_reported(slos)
        return slos

    async def publish_state(self) -> None:
        """Refreshes the gauges of the budget, the alert policies and the SLOs."""
        await self._budgets(self._policy.default_tenant)
        await self._evaluate_alerts()
        await self._slo_report()


_TERMINAL_STATES = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED)


def _outcomes_and_errors(
    events: list[metrics_pb2.JobEventRecord],
) -> tuple[list[JobOutcome], list[BackendError]]:
    """The terminal jobs, and the backend errors: failed jobs with a reason, attempts given up (a running
    job with a reason). An event without a time happened when received."""
    now = datetime.now(UTC)
    outcomes, errors = [], []
    for event in events:
        time = event.time.ToDatetime(UTC) if event.HasField("time") else now
        if event.state in _TERMINAL_STATES:
            succeeded = event.state == job_pb2.JOB_STATE_SUCCEEDED
            outcomes.append(
                JobOutcome(
                    job_id=event.job_id,
                    time=time,
                    backend=event.backend,
                    state=event.state,
                    qc_score=event.qc_score if succeeded else None,
                    duration_seconds=(
                        event.job_duration.ToTimedelta().total_seconds()
                        if event.HasField("job_duration")
                        else None
                    ),
                    cost_micros=event.cost.amount_micros,
                )
            )
        if (
            event.failure_reason
            and event.backend != backend_pb2.BACKEND_UNSPECIFIED
            and event.state in (job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_RUNNING)
        ):
            # Kept and labelled by its short name ("PROVIDER_FAILED"), as dashboards and alerts know it.
            errors.append(BackendError(event.job_id, time, event.backend, reason_name(event.failure_reason)))
    return outcomes, errors


async def publish_state_forever(servicer: MetricsServicer, interval_seconds: float) -> None:
    """Forever: keeps the service's state gauges fresh, also when nobody asks for it."""
    while True:
        try:
            await servicer.publish_state()
        except Exception:
            log.exception("publishing the budget, alert and SLO gauges failed; trying again")
        await asyncio.sleep(interval_seconds)


async def expire_stuck_reservations(
    ledger: LedgerStore, interval_seconds: float, telemetry: MetricsTelemetry
) -> None:
    """Forever: marks the reservations left unsettled past their expiry expired. Their attempts may have
    been billed, so their money stays counted (as spent, uncertain) until a late commit or release."""
    while True:
        try:
            expired = await ledger.expire_overdue()
            telemetry.reservation("expired", len(expired))
            for reservation in expired:
                log.warning(
                    "reservation expired",
                    reservation_key=reservation.key,
                    tenant=reservation.tenant,
                    job_id=reservation.job_id,
                    amount_micros=reservation.amount,
                    backend=backend_name(reservation.backend),
                    day=reservation.day,
                    counted="spent at its full amount until a commit or release reconciles it",
                )
        except Exception:
            log.exception("expiring reservations failed; trying again")
        await asyncio.sleep(interval_seconds)
