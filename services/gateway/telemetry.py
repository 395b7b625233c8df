"""The gateway's metrics: the life of jobs, exported through OpenTelemetry (docs/TELEMETRY.md).

Labels are the preset, the backend, the end state and the failure reason: never a job id or a prompt.
"""

from opentelemetry import metrics

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.capabilities import backend_name
from aiprod_kit.failures import reason_name
from aiprod_kit.presets import runway_only_micros


class GatewayMetrics:
    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("aiprod.gateway")
        self._created = meter.create_counter("aiprod.gateway.jobs_created", unit="{job}")
        self._completed = meter.create_counter("aiprod.gateway.jobs_completed", unit="{job}")
        self._failed = meter.create_counter("aiprod.gateway.jobs_failed", unit="{job}")
        self._cancelled = meter.create_counter("aiprod.gateway.jobs_cancelled", unit="{job}")
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
            description="Runway-alone list price of delivered videos minus what they cost",
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
        elif job.state == job_pb2.JOB_STATE_SUCCEEDED:
            self._completed.add(1, labels)
            self._record_duration(job, labels, "succeeded")
            self._quality.record(job.result.qc.score, labels)
            cost = job.result.cost.amount_micros / 1e6
            self._cost.record(cost, labels)
            seconds = job.result.video.duration_seconds or job.spec.duration_seconds
            if seconds > 0:
                self._cost_per_minute.record(cost * 60 / seconds, labels)
            # A counter only grows: a job dearer than Runway alone saved nothing.
            self._savings.add(max(runway_only_micros(seconds) / 1e6 - cost, 0.0), labels)

    def _record_duration(self, job: gateway_pb2.RenderJob, labels: dict[str, str], state: str) -> None:
        seconds = (job.update_time.ToNanoseconds() - job.create_time.ToNanoseconds()) / 1e9
        self._duration.record(seconds, {**labels, "state": state})
