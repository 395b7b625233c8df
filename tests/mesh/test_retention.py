"""Retention through the real mesh, its providers the sandbox's: the gateway deletes the jobs that ended
past it and the local videos no kept job names, the spend ledger the reservations settled past its own,
a renderer its keys of ended renders; the tenants' usage and the day's money keep counting them."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from helpers.mesh import budget, eventually, gateway, log_lines, metrics, wait_terminal
from helpers.sandbox import sandbox_mesh

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2

RETENTION = {
    # Long enough for the test to read each job as it ends (watched all at once), before it goes.
    "AIPROD_JOB_RETENTION_SECONDS": "3",
    "AIPROD_LEDGER_RETENTION_SECONDS": "1",
    "AIPROD_RETENTION_PURGE_INTERVAL_SECONDS": "0.2",
}


def not_found(call) -> str | None:
    """The details of the call's NOT_FOUND; None when it succeeds."""
    try:
        call()
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
        return error.details()
    return None


def test_what_ended_past_its_retention_is_deleted_and_usage_and_money_still_count_it(tmp_path):
    with sandbox_mesh(tmp_path, RETENTION) as mesh:
        stub = gateway(mesh)
        jobs = []
        for n in range(3):
            spec = render_pb2.RenderSpec(
                prompt=f"A lighthouse at dusk, take {n}",  # a video of its own each
                duration_seconds=6,
                constraints=render_pb2.RenderConstraints(preferred_backend=backend_pb2.BACKEND_REPLICATE),
            )
            request = gateway_pb2.CreateRenderJobRequest(request_id=f"kept-{n}", spec=spec)
            jobs.append(stub.CreateRenderJob(request).job.job_id)
        # Watched at once: watched one after the other, a job that ended first could be gone by its turn.
        with ThreadPoolExecutor(len(jobs)) as watches:
            done = list(watches.map(lambda job_id: wait_terminal(stub, job_id), jobs))
        assert [job.state for job in done] == [job_pb2.JOB_STATE_SUCCEEDED] * 3, [job.error for job in done]
        assert {job.backend for job in done} == {backend_pb2.BACKEND_REPLICATE}
        videos = [Path(urlsplit(job.result.video.uri).path) for job in done]
        assert len(set(videos)) == 3
        attempt = done[0].attempts[-1]
        # The ledger hears of each charge from the gateway's outbox, after the job ends: once it has all three.
        cost = sum(job.cost.amount_micros for job in done)
        assert eventually(lambda: budget(mesh).spent.amount_micros == cost, timeout=30)
        usage, spent = stub.GetUsage(gateway_pb2.GetUsageRequest()), budget(mesh).spent

        def get(job_id: str):
            return lambda: stub.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job_id))

        def commit_again() -> None:
            """The first job's charge told the ledger again: answered as the first, until it is forgotten."""
            charge = metrics_pb2.CommitSpendRequest(
                reservation_key=attempt.reservation_key, actual=attempt.charge.billed
            )
            metrics(mesh).CommitSpend(charge)

        # The jobs ended in any order, their charges settled in any order: each goes when its own time comes.
        assert eventually(lambda: all(not_found(get(job_id)) is not None for job_id in jobs[:2]), timeout=30)
        assert not_found(get(jobs[0])) == f"job {jobs[0]} does not exist (a job is kept 3 s after it ends)"
        assert eventually(lambda: not_found(commit_again) is not None, timeout=30)
        assert not_found(commit_again).endswith("(a settled reservation is kept 1 s after it settled)")
        assert eventually(lambda: log_lines(mesh, "replicate render keys"), timeout=30)
        assert all("purged past retention" in line for line in log_lines(mesh, "replicate render keys"))

        # The newest job stays (a position is never given twice); usage counts every job the tenant had,
        # and the day's money every reservation.
        assert not_found(get(jobs[2])) is None
        # The purged jobs' videos go with them; the kept job's stays.
        assert eventually(lambda: not any(video.exists() for video in videos[:2]), timeout=30)
        assert videos[2].exists()
        listed = stub.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(page_size=10)).jobs
        assert [job.job_id for job in listed] == [jobs[2]]
        assert stub.GetUsage(gateway_pb2.GetUsageRequest()) == usage
        assert budget(mesh).spent == spent and spent.amount_micros > 0
