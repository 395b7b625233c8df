"""`aiprod jobs`: list, show, follow and cancel render jobs; approve, edit and list the revisions of one in
review."""

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import field_mask_pb2

from aiprod.common.v1 import job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_cli.gateway import (
    CALL_TIMEOUT_SECONDS,
    DEFAULT_GATEWAY,
    ApiKeyOption,
    Gateway,
    GatewayOption,
    connect,
    exit_on_rpc_error,
)
from aiprod_cli.output import (
    JsonOption,
    job_table,
    job_to_dict,
    jobs_table,
    message_to_dict,
    money,
    plan_table,
    print_json,
    revisions_table,
    shots_table,
    stderr,
    stdout,
)
from aiprod_cli.render import print_video_or_exit, reporting_for, watch_video
from aiprod_cli.review import ReviewReporter, approve_command
from aiprod_cli.spec import AspectRatio, shot_from

app = typer.Typer(
    help="List, show, follow and cancel render jobs; review the ones awaiting approval (approve, edit, "
    "revisions).",
    no_args_is_help=True,
)

VersionOption = Annotated[
    int | None,
    typer.Option(
        "--version",
        metavar="N",
        min=1,
        help="The plan version last seen (default: the job's current one, read first); if the plan has "
        "changed since, nothing happens and the current version is said.",
    ),
]


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
        if len(job.plan.shots) > 1:
            stdout.print(shots_table(job))


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
    api_key: ApiKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    request = gateway_pb2.ListRenderJobsRequest(
        page_size=page_size or 0, states=[choice.to_proto() for choice in state or []]
    )
    jobs: list[gateway_pb2.RenderJob] = []
    with exit_on_rpc_error(gateway), connect(gateway, api_key) as connection:
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
    api_key: ApiKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Show one job."""
    with exit_on_rpc_error(gateway), connect(gateway, api_key) as connection:
        response = connection.stub.GetRenderJob(
            gateway_pb2.GetRenderJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_SECONDS
        )
    _print_job(response.job, json_output)


@app.command("watch")
def watch_job(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    out: Annotated[Path | None, typer.Option(metavar="FILE", help="Copy the video here.")] = None,
    gateway: GatewayOption = DEFAULT_GATEWAY,
    api_key: ApiKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Follow a job to its end, as `aiprod render` does, and print the video's path.

    Shows the job's events so far, then each new one; a job awaiting approval shows its plan and how to
    approve it, and is followed once approved. Picks up a render that Ctrl-C stopped following, or a job
    another service ordered.

    Exits 1 when the job fails or is cancelled, 2 when the gateway refuses (no such job).
    Ctrl-C stops following; the job goes on.
    """
    print_video_or_exit(
        gateway,
        json_output,
        lambda: watch_video(
            gateway,
            api_key,
            job_id,
            out,
            reporting_for(json_output),
            ReviewReporter(stderr, brief=json_output),
        ),
    )


@app.command("cancel")
def cancel_job(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    reason: Annotated[str, typer.Option(metavar="TEXT", help="Why, kept on the job.")] = "",
    gateway: GatewayOption = DEFAULT_GATEWAY,
    api_key: ApiKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Cancel a job that has not ended; exits 2 if it has."""
    with exit_on_rpc_error(gateway), connect(gateway, api_key) as connection:
        response = connection.stub.CancelRenderJob(
            gateway_pb2.CancelRenderJobRequest(job_id=job_id, reason=reason), timeout=CALL_TIMEOUT_SECONDS
        )
    _print_job(response.job, json_output)


def _get(connection: Gateway, job_id: str) -> gateway_pb2.RenderJob:
    return connection.stub.GetRenderJob(
        gateway_pb2.GetRenderJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_SECONDS
    ).job


@app.command("approve")
def approve_job(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    version: VersionOption = None,
    gateway: GatewayOption = DEFAULT_GATEWAY,
    api_key: ApiKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Approve a job awaiting approval: it is queued and renders (`aiprod render` following it goes on).

    Exits 2 when the gateway refuses: the job is not awaiting approval, or its plan changed since --version.
    """
    with exit_on_rpc_error(gateway), connect(gateway, api_key) as connection:
        plan_version = version or (_get(connection, job_id).plan_version or 1)
        job = connection.stub.ApproveRenderJob(
            gateway_pb2.ApproveRenderJobRequest(job_id=job_id, plan_version=plan_version),
            timeout=CALL_TIMEOUT_SECONDS,
        ).job
    if not json_output:
        stderr.print(f"approved plan version {plan_version} of {job_id}", markup=False, highlight=False)
    _print_job(job, json_output)


@app.command("edit")
def edit_job(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    prompt: Annotated[str | None, typer.Option(metavar="TEXT", help="The shot's new prompt.")] = None,
    duration: Annotated[
        float | None, typer.Option(metavar="SECONDS", min=0, help="The shot's new length.")
    ] = None,
    aspect_ratio: Annotated[AspectRatio | None, typer.Option(help="The shot's new frame shape.")] = None,
    shot: Annotated[int, typer.Option(metavar="INDEX", min=0, help="The shot to edit, from 0.")] = 0,
    add: Annotated[
        render_pb2.Shot | None,
        typer.Option(
            metavar="SECONDS:PROMPT",
            parser=shot_from,
            help="Add a shot, at --at (default: after the last one).",
        ),
    ] = None,
    at: Annotated[int | None, typer.Option(metavar="INDEX", min=0, help="Where --add puts the shot.")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the shot --shot names.")] = False,
    move_to: Annotated[
        int | None, typer.Option(metavar="INDEX", min=0, help="Move the shot --shot names to this place.")
    ] = None,
    version: VersionOption = None,
    gateway: GatewayOption = DEFAULT_GATEWAY,
    api_key: ApiKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Edit the plan of a job awaiting approval: the edit becomes the plan's next version, re-quoted.

    Change one shot (--shot, with --prompt, --duration, --aspect-ratio), or the list of shots: add one
    (--add, --at), remove one (--remove) or move one (--move-to).

    Exits 2 when the gateway refuses: the job is not awaiting approval, the plan changed since --version
    (ABORTED: nothing changed; the current version is said), or the new plan is not valid.
    """
    changes_shot = prompt is not None or duration is not None or aspect_ratio is not None
    reshapes = [
        name for name, given in (("--add", add), ("--remove", remove), ("--move-to", move_to)) if given
    ]
    if at is not None and add is None:
        stderr.print("error: --at places the shot --add adds", markup=False)
        raise typer.Exit(2)
    if not changes_shot and not reshapes:
        stderr.print(
            "error: nothing to change: give --prompt, --duration or --aspect-ratio, or --add, --remove or "
            "--move-to",
            markup=False,
        )
        raise typer.Exit(2)
    if len(reshapes) > 1:
        stderr.print(f"error: one change of the shots at a time, not {' and '.join(reshapes)}", markup=False)
        raise typer.Exit(2)
    if changes_shot and (remove or add):
        stderr.print(
            f"error: {reshapes[0]} changes the list of shots; edit a shot's fields in another call",
            markup=False,
        )
        raise typer.Exit(2)
    with exit_on_rpc_error(gateway), connect(gateway, api_key) as connection:
        current = _get(connection, job_id)
        plan = render_pb2.RenderPlan()
        plan.CopyFrom(current.plan)
        try:
            _reshape(plan, shot, add, at, remove, move_to)
        except NoSuchPlace as error:
            stderr.print(f"error: {error}", markup=False)
            raise typer.Exit(2) from None
        if changes_shot:
            edited = plan.shots[move_to if move_to is not None else shot]
            if prompt is not None:
                edited.prompt = prompt
            if duration is not None:
                edited.duration_seconds = duration
            if aspect_ratio is not None:
                edited.aspect_ratio = aspect_ratio.to_proto()
        plan_version = version or (current.plan_version or 1)
        request = gateway_pb2.UpdateRenderManifestRequest(
            job_id=job_id,
            plan=plan,
            update_mask=field_mask_pb2.FieldMask(paths=["shots"]),
            plan_version=plan_version,
        )
        job = connection.stub.UpdateRenderManifest(request, timeout=CALL_TIMEOUT_SECONDS).job
    if json_output:
        print_json(job_to_dict(job))
        return
    stdout.print(plan_table(job.plan, job.plan_version))
    price = f", price {money(job.quote.price)}" if job.quote.HasField("price") else ""
    stdout.print(f"plan version {job.plan_version}{price}", markup=False, highlight=False)
    stderr.print(
        f"approve it with: {approve_command(job_id, job.plan_version)}", markup=False, highlight=False
    )


class NoSuchPlace(ValueError):
    """An edit names a shot, or a place for one, that the job's plan does not have."""


def _reshape(
    plan: render_pb2.RenderPlan,
    index: int,
    add: render_pb2.Shot | None,
    at: int | None,
    remove: bool,
    move_to: int | None,
) -> None:
    """Adds, removes or moves a shot of the plan (with none of them, only checks that --shot names one);
    NoSuchPlace when an option names a place the plan lacks."""
    shots = list(plan.shots)
    count = len(shots)
    if add is not None:
        place = count if at is None else at
        if place > count:
            raise NoSuchPlace(f"--at {place}: the plan has {count} shot(s); a shot goes at 0 to {count}")
        # A new shot takes the frame shape of the one it follows (or precedes, at the start).
        neighbour = shots[place - 1] if place else shots[0] if shots else None
        added = render_pb2.Shot()
        added.CopyFrom(add)
        if neighbour is not None:
            added.aspect_ratio = neighbour.aspect_ratio
        shots.insert(place, added)
    elif index >= count:
        raise NoSuchPlace(f"--shot {index}: the plan has {count} shot(s), from 0")
    elif remove:
        del shots[index]
    elif move_to is not None:
        if move_to >= count:
            raise NoSuchPlace(f"--move-to {move_to}: the plan has {count} shot(s), from 0")
        shots.insert(move_to, shots.pop(index))
    del plan.shots[:]
    plan.shots.extend(shots)


@app.command("revisions")
def list_revisions(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    gateway: GatewayOption = DEFAULT_GATEWAY,
    api_key: ApiKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """List a job's plan revisions, oldest first.

    Each with its version, when and by whom (the API key's prefix) it was made, what changed and its price.
    """
    with exit_on_rpc_error(gateway), connect(gateway, api_key) as connection:
        response = connection.stub.ListRenderRevisions(
            gateway_pb2.ListRenderRevisionsRequest(job_id=job_id), timeout=CALL_TIMEOUT_SECONDS
        )
    if json_output:
        print_json({"revisions": [message_to_dict(revision) for revision in response.revisions]})
    else:
        stdout.print(revisions_table(list(response.revisions)))
