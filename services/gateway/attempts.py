"""A job's attempts as the ledger sees them: the line each reserved, its render, and what it cost.

Every change to them comes from a render event (or a cancel's answer) and is applied in the same
transaction as the event that records it, so the job's cost and its settlement outbox never disagree
with its log. Events may come twice (a router re-attached after a restart repeats an attempt's end):
applying one again changes nothing.

Whose money: each charge names the ledger account that pays it. The job's cost is what its tenant
pays; a free re-render its SLA tier granted (another account: the company's) counts in company_cost
instead. A charge that names no account (a cancel's or a reconciliation's, from a router that did not
reserve the attempt) keeps the account the attempt's earlier charge named, else is the tenant's.
"""

from aiprod.common.v1 import backend_pb2, event_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.capabilities import backend_name
from aiprod_kit.money import usd


def _attempt(job: gateway_pb2.RenderJob, shot: int, number: int) -> gateway_pb2.RenderAttempt:
    for attempt in job.attempts:
        if attempt.shot == shot and attempt.attempt == number:
            return attempt
    # A new attempt is listed last: the attempts are in the order they started.
    return job.attempts.add(shot=shot, attempt=number)


def routed(job: gateway_pb2.RenderJob, shot: int, number: int, decision: event_pb2.RouteDecision) -> None:
    attempt = _attempt(job, shot, number)
    attempt.backend = decision.backend
    attempt.reservation_key = decision.reservation_key
    attempt.reserved.CopyFrom(decision.reserved)
    job.reserved.CopyFrom(usd(sum(item.reserved.amount_micros for item in job.attempts)))


def submitted(job: gateway_pb2.RenderJob, shot: int, number: int, handle: backend_pb2.RenderHandle) -> None:
    attempt = _attempt(job, shot, number)
    attempt.backend = handle.backend
    attempt.handle.CopyFrom(handle)


def charged(job: gateway_pb2.RenderJob, shot: int, number: int, charge: event_pb2.AttemptCharge) -> None:
    attempt = _attempt(job, shot, number)
    if not charge.account and attempt.charge.account:
        known = event_pb2.AttemptCharge()
        known.CopyFrom(charge)
        known.account = attempt.charge.account
        charge = known
    if attempt.HasField("charge") and attempt.charge == charge:
        return  # a repeat: its settlement stands
    attempt.charge.CopyFrom(charge)
    attempt.settled = False
    if not attempt.reservation_key and charge.reservation_key:
        attempt.reservation_key = charge.reservation_key
    tenant, company = costs(job)
    job.cost.CopyFrom(usd(tenant))
    if company or job.HasField("company_cost"):
        job.company_cost.CopyFrom(usd(company))
    if shot < len(job.shots):
        job.shots[shot].cost.CopyFrom(usd(costs(job, shot)[0]))


def paid_by_company(job: gateway_pb2.RenderJob, attempt: gateway_pb2.RenderAttempt) -> bool:
    """Whether another account than the job's tenant pays the attempt: its free re-render."""
    return attempt.charge.account not in ("", job.tenant_id)


def costs(job: gateway_pb2.RenderJob, shot: int | None = None) -> tuple[int, int]:
    """What the job's committed attempts (of one shot, or all) cost its tenant, and the company (its free
    re-render)."""
    tenant = company = 0
    for item in job.attempts:
        if shot is not None and item.shot != shot:
            continue
        if item.charge.outcome == event_pb2.CHARGE_OUTCOME_COMMIT:
            if paid_by_company(job, item):
                company += item.charge.billed.amount_micros
            else:
                tenant += item.charge.billed.amount_micros
    return tenant, company


def may_have_billed(job: gateway_pb2.RenderJob) -> bool:
    """Whether any attempt of the job reached a provider's bill (or may have)."""
    return any(
        attempt.charge.outcome in (event_pb2.CHARGE_OUTCOME_COMMIT, event_pb2.CHARGE_OUTCOME_HOLD)
        or (attempt.HasField("handle") and not attempt.HasField("charge"))
        for attempt in job.attempts
    )


def charge_message(charge: event_pb2.AttemptCharge) -> str:
    """What an attempt's charge says, for people."""
    name = backend_name(charge.backend)
    if charge.outcome == event_pb2.CHARGE_OUTCOME_COMMIT:
        return f"{name} bills {charge.billed.amount_micros / 1e6:.2f} USD for the attempt"
    if charge.outcome == event_pb2.CHARGE_OUTCOME_HOLD:
        return f"whether {name} bills the attempt is not known: its reservation is held until reconciled"
    return f"{name} bills nothing for the attempt"
