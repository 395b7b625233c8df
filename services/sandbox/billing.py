"""What each provider would bill for each task, under its own rules and the model's price.

A task is billed once, at the moment it reaches its final state (`TaskBoard` calls `settle`): a task
still running bills nothing yet, and a create refused before its task existed bills nothing at all.
The amount comes from the task's details, which each provider module fills at create time with the
price in force then (a later price change applies to later tasks):

- Runway: SUCCEEDED bills `cost.credits`; FAILED (safety included) bills 0; CANCELLED by a DELETE,
  in whatever state, bills the full estimate. A finished task that is then deleted keeps its bill.
- Vertex (Veo): done with videos bills price/s x durationSeconds x the videos returned; done with an
  error, or with every video filtered, bills 0.
- Replicate: succeeded bills price per output second x the input's duration; failed or canceled, 0.

Amounts are integer micro-USD. The bills are read beside the create counters and cleared with them.
"""

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import structlog

from aiprod_sandbox.config import PROVIDERS
from aiprod_sandbox.tasks import Job

log = structlog.get_logger()


@runtime_checkable
class Billed(Protocol):
    """A provider's task details that know the model and the provider's bill for the task."""

    model: str

    def bill_micros(self, job: Job) -> int: ...


@dataclass(frozen=True)
class Bill:
    micros: int
    state: str
    key: str
    model: str

    def as_json(self) -> dict[str, Any]:
        return {"micros": self.micros, "state": self.state, "key": self.key, "model": self.model}


class Billing:
    """Every settled task's bill. Only touched from the event loop, so it needs no lock."""

    def __init__(self) -> None:
        self._bills: dict[str, dict[str, Bill]] = {provider: {} for provider in PROVIDERS}

    def settle(self, job: Job) -> None:
        """Records the bill of a task that just reached its final state (once per task)."""
        bills = self._bills[job.provider]
        if job.id in bills:
            return
        details = job.details if isinstance(job.details, Billed) else None
        try:
            micros = details.bill_micros(job) if details is not None else 0
        except Exception:
            # A bug in a price rule must not break the task's own end; the log says which task.
            log.exception("billing_failed", provider=job.provider, task_id=job.id)
            return
        model = details.model if details is not None else ""
        bills[job.id] = Bill(micros, job.phase.value, job.idempotency_key, model)

    def clear(self) -> None:
        for bills in self._bills.values():
            bills.clear()

    def as_json(self) -> dict[str, Any]:
        totals = {
            provider: sum(bill.micros for bill in bills.values()) for provider, bills in self._bills.items()
        }
        return {
            "billing": {
                provider: {task_id: bill.as_json() for task_id, bill in bills.items()}
                for provider, bills in self._bills.items()
            },
            "billed_total_micros": totals,
            "billed_total_micros_all": sum(totals.values()),
        }
