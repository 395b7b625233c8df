"""A job in review, as `aiprod render` shows it: the plan, the quote and how to approve, then each
change (a new plan version, the approval, a cancel) until the job leaves AWAITING_APPROVAL."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_cli.gateway import Gateway
from aiprod_cli.interrupt import Interrupt
from aiprod_cli.output import money, plan_table, quote_table
from aiprod_cli.watch import follow_job

AWAITING = job_pb2.JOB_STATE_AWAITING_APPROVAL


def approve_command(job_id: str, version: int) -> str:
    return f"aiprod jobs approve {job_id} --version {version}"


class ReviewReporter:
    """Shows a job waiting for approval on a console (stderr: stdout is the result's). brief: one line
    per change and no tables, for --json (a script reads stdout, a person may still read stderr)."""

    def __init__(self, console: Console, brief: bool = False) -> None:
        self._console = console
        self._brief = brief

    def _say(self, text: str) -> None:
        self._console.print(text, markup=False, highlight=False, soft_wrap=True)

    def awaiting(self, job: gateway_pb2.RenderJob) -> None:
        version = job.plan_version or 1
        if not self._brief:
            self._console.print(plan_table(job.plan, version))
            if job.HasField("quote"):
                self._console.print(quote_table(job.quote))
        self._say(
            f"job {job.job_id} awaits approval of plan version {version}; approve it with:\n"
            f"  {approve_command(job.job_id, version)}"
        )
        if not self._brief:
            self._say(
                f"or edit it (`aiprod jobs edit {job.job_id} --prompt ... --version {version}`), or cancel it "
                f"(`aiprod jobs cancel {job.job_id}`). Waiting for approval; Ctrl-C stops waiting, the job "
                "keeps waiting."
            )

    def event(self, event: gateway_pb2.JobEvent) -> None:
        if event.HasField("plan_updated"):
            revision = event.plan_updated
            price = (
                revision.quote.price if revision.quote.HasField("price") else revision.quote.estimated_cost
            )
            changes = ", ".join(revision.changes) or "nothing"
            self._say(
                f"plan version {revision.plan_version} by {revision.author or 'someone'} "
                f"(changed: {changes}; price {money(price)}); approve it with:\n"
                f"  {approve_command(event.job_id, revision.plan_version)}"
            )
            if not self._brief:
                self._console.print(plan_table(revision.plan, revision.plan_version))
        elif event.HasField("approved"):
            approval = event.approved
            self._say(f"approved: plan version {approval.plan_version} by {approval.approver or 'someone'}")
        elif event.HasField("cancelled"):
            cancellation = event.cancelled
            self._say(
                f"cancelled in review by {cancellation.cancelled_by or 'someone'}: "
                f"{cancellation.reason or 'no reason given'}"
            )

    def reconnecting(self, reason: str) -> None:
        self._say(f"stream broken ({reason}); reconnecting…")

    @contextmanager
    def waiting(self) -> Iterator[None]:
        if self._brief:
            yield
            return
        with self._console.status("awaiting approval…"):
            yield


@dataclass(frozen=True)
class Reviewed:
    """Where a job stood when it left review: its state, and the last event seen (the follow resumes after)."""

    state: int
    after_sequence: int
    plan_version: int


def await_approval(
    gateway: Gateway,
    job: gateway_pb2.RenderJob,
    reporter: ReviewReporter,
    interrupt: Interrupt | None = None,
) -> Reviewed:
    """Follows a job awaiting approval, reporting each change, until it leaves AWAITING_APPROVAL.

    Ctrl-C raises KeyboardInterrupt (through interrupt, when one is installed).
    """
    after, version = job.last_sequence, job.plan_version or 1
    reporter.awaiting(job)
    with reporter.waiting():
        for response in follow_job(
            gateway, job.job_id, reporter.reconnecting, after_sequence=after, interrupt=interrupt
        ):
            if response.WhichOneof("kind") == "job":
                snapshot = response.job
                version = snapshot.plan_version or version
                if snapshot.state != AWAITING:
                    # Approved (or cancelled) meanwhile: the events from `after` on say how; the
                    # render's follow shows them.
                    return Reviewed(snapshot.state, after, version)
                continue
            event = response.event
            after = event.sequence
            reporter.event(event)
            if event.HasField("plan_updated"):
                version = event.plan_updated.plan_version
            if event.state != AWAITING:
                return Reviewed(event.state, after, version)
    # follow_job ends only with a terminal state, which returned above.
    raise AssertionError("the job's stream ended while it awaited approval")
