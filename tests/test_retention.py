"""Retention through the real mesh: a gateway deletes the jobs that ended past it, and its tenants'
figures keep counting them."""

import grpc
from support import eventually, gateway, start_mesh, wait_terminal

from aiprod.common.v1 import job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2


def test_jobs_ended_past_the_retention_are_deleted_and_usage_still_counts_them(tmp_path):
    mesh = start_mesh(
        tmp_path, AIPROD_JOB_RETENTION_SECONDS="1", AIPROD_RETENTION_PURGE_INTERVAL_SECONDS="0.2"
    )
    try:
        stub = gateway(mesh)
        spec = render_pb2.RenderSpec(prompt="A lighthouse at dusk", duration_seconds=2)
        jobs = []
        for n in range(3):
            request = gateway_pb2.CreateRenderJobRequest(request_id=f"kept-{n}", spec=spec)
            jobs.append(stub.CreateRenderJob(request).job.job_id)
        for job_id in jobs:
            assert wait_terminal(stub, job_id).state == job_pb2.JOB_STATE_SUCCEEDED
        usage = stub.GetUsage(gateway_pb2.GetUsageRequest())

        def gone(job_id: str) -> bool:
            try:
                stub.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job_id))
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                assert error.details() == f"job {job_id} does not exist (a job is kept 1 s after it ends)"
                return True
            return False

        assert eventually(lambda: gone(jobs[0]) and gone(jobs[1]), timeout=30)
        # The newest job stays (a position is never given twice); usage counts every job the tenant had.
        assert not gone(jobs[2])
        listed = stub.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(page_size=10)).jobs
        assert [job.job_id for job in listed] == [jobs[2]]
        assert stub.GetUsage(gateway_pb2.GetUsageRequest()) == usage
    finally:
        mesh.stop()
