"""The gateway's metrics: the life of jobs and the calls refused for their key, exported through
OpenTelemetry (docs/TELEMETRY.md).

Labels are the preset, the backend, the end state, the failure reason and the RPC's service: never a job
id, a prompt, a key or a caller's address.
"""

from opentelemetry import metrics

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.capabilities import backend_name
from aiprod_kit.failures import reason_name
from aiprod_kit.telemetry import Tally


class GatewayMetrics:
    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("aiprod.gateway")
        # Tallies: jobs_created is counted on the accept path, at every create.
        self._created = Tally(meter, "aiprod.gateway.jobs_created", unit="{job}")
        self._completed = Tally(meter, "aiprod.gateway.jobs_completed", unit="{job}")
        self._failed = Tally(meter, "aiprod.gateway.jobs_failed", unit="{job}")
        self._cancelled = Tally(meter, "aiprod.gateway.jobs_cancelled", unit="{job}")
        self._duration = meter.create_histogram(
            "aiprod.gateway.job_duration", unit="s", description="From creation to the end of a job"
        )
        self._quality = meter.create_histogram(
            "aiprod.gateway.job_quality", description="QC score of delivered videos"
        )
        self._cost = meter.create_histogram(
            "aiprod.gateway.job_cost", unit="{USD}", description="What a delivered job cost"
        )
        self._cost_per_minute = meter.create_histogram(
            "aiprod.gateway.cost_per_minute", unit="{USD}", description="Cost per minute of delivered video"
        )
        self._savings = meter.create_counter(
            "aiprod.gateway.savings",
            unit="{USD}",
            description="The baseline backend's estimate in the quotes of delivered videos minus what they cost",
        )
        self._quote_variance = meter.create_histogram(
            "aiprod.gateway.quote_variance",
            description="What jobs that succeeded or failed cost over their quoted price (1: as quoted)",
        )

    def job_changed(self, job: gateway_pb2.RenderJob) -> None:
        preset = {"preset": job.spec.preset}
        if job.last_sequence == 1:
            self._created.add(1, preset)
            return
        labels = {**preset, "backend": backend_name(job.backend)}
        if job.state == job_pb2.JOB_STATE_CANCELLED:
            self._cancelled.add(1, preset)
        elif job.state == job_pb2.JOB_STATE_FAILED:
            self._failed.add(1, {**labels, "reason": reason_name(job.error.reason)})
            self._record_duration(job, labels, "failed")
            self._record_variance(job, labels, "failed")
        elif job.state == job_pb2.JOB_STATE_SUCCEEDED:
            self._completed.add(1, labels)
            self._record_duration(job, labels, "succeeded")
            self._record_variance(job, labels, "succeeded")
            self._quality.record(job.result.qc.score, labels)
            cost = job.result.cost.amount_micros / 1e6
            self._cost.record(cost, labels)
            seconds = job.result.video.duration_seconds or job.spec.duration_seconds
            if seconds > 0:
                self._cost_per_minute.record(cost * 60 / seconds, labels)
            if job.quote.HasField("baseline_cost"):
                # A counter only grows: a job dearer than its baseline saved nothing.
                saved = job.quote.baseline_cost.amount_micros - _actual_micros(job)
                self._savings.add(max(saved, 0) / 1e6, labels)

    def _record_variance(self, job: gateway_pb2.RenderJob, labels: dict[str, str], state: str) -> None:
        """Actual against quoted: what the job cost its tenant over its quote's price, a ratio (a histogram
        takes no negative values; the relative variance is this less 1). A cancelled job is left out: what
        it cost says when it was cancelled, not how good the quote was."""
        quoted = job.quote.price.amount_micros
        if quoted > 0:
            self._quote_variance.record(_actual_micros(job) / quoted, {**labels, "state": state})

    def _record_duration(self, job: gateway_pb2.RenderJob, labels: dict[str, str], state: str) -> None:
        seconds = (job.update_time.ToNanoseconds() - job.create_time.ToNanoseconds()) / 1e9
        self._duration.record(seconds, {**labels, "state": state})


class AuthMetrics:
    """aiprod.gateway.auth_failures: every call a guard refused (UNAUTHENTICATED, PERMISSION_DENIED), by
    its ErrorInfo reason and service. Not by peer: addresses are unbounded, the log names them."""

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("aiprod.gateway")
        self._failures = meter.create_counter(
            "aiprod.gateway.auth_failures", unit="{request}", description="Calls refused for their key"
        )

    def failed(self, service: str, reason: str) -> None:
        self._failures.add(1, {"rpc.service": service, "reason": reason})


def _actual_micros(job: gateway_pb2.RenderJob) -> int:
    """What the job cost its tenant: its attempts' bills (a job recorded before attempts were: its
    video's cost)."""
    return job.cost.amount_micros if job.HasField("cost") else job.result.cost.amount_micros
