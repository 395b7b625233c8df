"""`aiprod jobs`: list, show and cancel render jobs."""

from enum import StrEnum
from typing import Annotated

import typer

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_cli.gateway import (
    CALL_TIMEOUT_SECONDS,
    DEFAULT_GATEWAY,
    GatewayOption,
    connect,
    exit_on_rpc_error,
)
from aiprod_cli.output import JsonOption, job_table, job_to_dict, jobs_table, print_json, stderr, stdout

app = typer.Typer(help="List, show and cancel render jobs.", no_args_is_help=True)


class State(StrEnum):
    QUEUED = "queued"
    AWAITING_APPROVAL = "awaiting_approval"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def to_proto(self) -> job_pb2.JobState:
        return job_pb2.JobState.Value("JOB_STATE_" + self.name)


def _print_job(job: gateway_pb2.RenderJob, json_output: bool) -> None:
    if json_output:
        print_json(job_to_dict(job))
    else:
        stdout.print(job_table(job))


@app.command("list")
def list_jobs(
    state: Annotated[
        list[State] | None,
        typer.Option(case_sensitive=False, help="Only jobs in this state; repeat for several."),
    ] = None,
    page_size: Annotated[
        int | None, typer.Option(min=1, max=1000, help="Jobs per page (default: the gateway's, 50).")
    ] = None,
    all_pages: Annotated[bool, typer.Option("--all", help="Follow every page, not just the first.")] = False,
    gateway: GatewayOption = DEFAULT_GATEWAY,
    json_output: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    request = gateway_pb2.ListRenderJobsRequest(
        page_size=page_size or 0, states=[choice.to_proto() for choice in state or []]
    )
    jobs: list[gateway_pb2.RenderJob] = []
    with exit_on_rpc_error(gateway), connect(gateway) as connection:
        while True:
            response = connection.stub.ListRenderJobs(request, timeout=CALL_TIMEOUT_SECONDS)
            jobs.extend(response.jobs)
            if not (all_pages and response.next_page_token):
                break
            request.page_token = response.next_page_token
    if json_output:
        print_json({"jobs": [job_to_dict(job) for job in jobs], "next_page_token": response.next_page_token})
        return
    stdout.print(jobs_table(jobs))
    if response.next_page_token:
        stderr.print("more jobs on further pages: --all lists them all")


@app.command("get")
def get_job(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    gateway: GatewayOption = DEFAULT_GATEWAY,
    json_output: JsonOption = False,
) -> None:
    """Show one job."""
    with exit_on_rpc_error(gateway), connect(gateway) as connection:
        response = connection.stub.GetRenderJob(
            gateway_pb2.GetRenderJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_SECONDS
        )
    _print_job(response.job, json_output)


@app.command("cancel")
def cancel_job(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    reason: Annotated[str, typer.Option(metavar="TEXT", help="Why, kept on the job.")] = "",
    gateway: GatewayOption = DEFAULT_GATEWAY,
    json_output: JsonOption = False,
) -> None:
    """Cancel a job that has not ended; exits 2 if it has."""
    with exit_on_rpc_error(gateway), connect(gateway) as connection:
        response = connection.stub.CancelRenderJob(
            gateway_pb2.CancelRenderJobRequest(job_id=job_id, reason=reason), timeout=CALL_TIMEOUT_SECONDS
        )
    _print_job(response.job, json_output)
