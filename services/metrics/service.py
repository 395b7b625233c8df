"""MetricsService: job counts per backend and state; the ledger, alerts and SLOs arrive with issue 5."""

from collections import Counter

import grpc

from aiprod.common.v1 import backend_pb2, job_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_kit.errors import InvalidArgument, Unimplemented
from aiprod_kit.money import usd

DEFAULT_TENANT = "default"
_LEDGER_PENDING = "the spend ledger is not implemented yet (planned: issue 5, money and observability)"


class MetricsServicer(metrics_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self._job_counts: Counter[tuple[int, int]] = Counter()

    async def RecordJobEvent(
        self, request: metrics_pb2.RecordJobEventRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.RecordJobEventResponse:
        violations = []
        for index, event in enumerate(request.events):
            if event.state not in job_pb2.JobState.values() or event.state == job_pb2.JOB_STATE_UNSPECIFIED:
                violations.append((f"events[{index}].state", "must be a known job state"))
            if event.backend not in backend_pb2.Backend.values():
                violations.append((f"events[{index}].backend", "must be a known backend"))
        if violations:
            raise InvalidArgument(violations)
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

    async def GetBudget(
        self, request: metrics_pb2.GetBudgetRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.GetBudgetResponse:
        # No ledger yet, so nothing has been spent or reserved, and there is no cap.
        return metrics_pb2.GetBudgetResponse(
            budget=metrics_pb2.Budget(
                tenant_id=request.tenant_id or DEFAULT_TENANT,
                cap=usd(0),
                spent=usd(0),
                reserved=usd(0),
                remaining=usd(0),
            )
        )

    async def ReserveBudget(self, request, context):  # type: ignore[no-untyped-def]
        raise Unimplemented(_LEDGER_PENDING)

    async def CommitSpend(self, request, context):  # type: ignore[no-untyped-def]
        raise Unimplemented(_LEDGER_PENDING)

    async def ReleaseBudget(self, request, context):  # type: ignore[no-untyped-def]
        raise Unimplemented(_LEDGER_PENDING)

    async def ListAlerts(self, request, context):  # type: ignore[no-untyped-def]
        raise Unimplemented("alert policies are not implemented yet (planned: issue 5)")

    async def GetSloReport(self, request, context):  # type: ignore[no-untyped-def]
        raise Unimplemented("SLO reports are not implemented yet (planned: issue 5)")
