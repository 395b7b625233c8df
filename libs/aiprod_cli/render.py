"""`aiprod render`: orders a video, follows it to its end and hands over the file."""

import asyncio
import shutil
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlparse

import grpc
import typer

from aiprod.common.v1 import job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_cli.explain import explain_route
from aiprod_cli.gateway import (
    CALL_TIMEOUT_SECONDS,
    DEFAULT_GATEWAY,
    ApiKeyOption,
    Gateway,
    GatewayOption,
    connect,
    exit_on_rpc_error,
    require_key,
)
from aiprod_cli.interrupt import Interrupt, interruptible
from aiprod_cli.output import (
    JsonOption,
    estimates_table,
    job_to_dict,
    message_to_dict,
    offer_name,
    print_json,
    print_line,
    state_name,
    stderr,
)
from aiprod_cli.progress import Reporter, SilentReporter, progress_reporter
from aiprod_cli.review import ReviewReporter, approve_command, await_approval
from aiprod_cli.spec import (
    AspectRatioOption,
    BackendOption,
    ContinuousOption,
    DeadlineOption,
    DurationOption,
    FirstFrameOption,
    MaxCostOption,
    ModelOption,
    PresetOption,
    PromptArgument,
    QualityFloorOption,
    ReferenceImageOption,
    ResolutionOption,
    SeedOption,
    ShotOption,
    build_spec,
)
from aiprod_cli.watch import TERMINAL_STATES, GatewayLost, follow_job
from aiprod_kit.failures import reason_name

# The exit status when no video came out: the job failed, or the CLI stopped following it.
EXIT_RENDER_FAILED = 1


class RenderError(Exception):
    """No video came out here: the job failed, or the CLI stopped following it."""

    def __init__(self, message: str, job: gateway_pb2.RenderJob | None = None) -> None:
        super().__init__(message)
        # The job as last seen, when the CLI has it.
        self.job = job


@dataclass(frozen=True)
class RenderResult:
    job: gateway_pb2.RenderJob
    # The video's absolute local path (the copy, with --out), or its URI when it is not a local file.
    video: str


def deliver_video(job: gateway_pb2.RenderJob, out: Path | None) -> str:
    """The video's local path, or its URI when it is not local; with out, the path of a copy made there
    first, from the local disk or from Google Cloud Storage (with the Application Default Credentials).

    Raises RenderError when the copy cannot be made (the job is still done: its video is where it was).
    """
    uri = job.result.video.uri
    parsed = urlparse(uri)
    if out is None:
        return str(Path(unquote(parsed.path))) if parsed.scheme == "file" else uri
    target = out.resolve()
    # Written beside the target and renamed, so that an interrupted copy leaves no half a video.
    partial = target.with_name(f".{target.name}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if parsed.scheme == "file":
            shutil.copyfile(unquote(parsed.path), partial)
        elif parsed.scheme == "gs":
            _download_from_gcs(uri, partial)
        else:
            raise RenderError(f"cannot copy {uri} to {out}: only file:// and gs:// videos are copied", job)
        partial.replace(target)
    except CopyFailed as failed:
        raise RenderError(f"cannot copy {uri} to {out}: {failed}", job) from None
    except OSError as error:
        raise RenderError(f"cannot copy {uri} to {out}: {error.strerror or error}", job) from None
    finally:
        partial.unlink(missing_ok=True)
    return str(target)


class CopyFailed(Exception):
    """A video could not be copied from where it is stored."""


def _download_from_gcs(uri: str, destination: Path) -> None:
    """Through the renderers' own Cloud Storage store, with the Application Default Credentials."""
    # Imported here: the storage client is a heavy import that every other command can do without.
    from google.api_core.exceptions import GoogleAPICallError
    from google.auth.exceptions import DefaultCredentialsError

    from aiprod_kit.rendering.gcs import GcsVideoStore

    try:
        asyncio.run(GcsVideoStore(urlparse(uri).netloc).fetch(uri, destination))
    except DefaultCredentialsError:
        raise CopyFailed(
            "no Google Cloud credentials here (`gcloud auth application-default login` makes them)"
        ) from None
    except GoogleAPICallError as error:
        raise CopyFailed(f"Cloud Storage answered {error.code}: {error.message}") from None
    except ValueError as error:  # a gs:// URI that names no object
        raise CopyFailed(str(error)) from None


def _preference_not_taken(asked: render_pb2.RenderConstraints, quote: gateway_pb2.Quote) -> str | None:
    """Why the backend (--backend) or model (--model) asked for is not the quote's route, for people;
    None when it is.

    A preference is soft: the router takes another when the one asked does not qualify."""
    backend, model = asked.preferred_backend, asked.preferred_model
    if not backend or not quote.backend:
        return None
    if quote.backend == backend and (not model or quote.model == model):
        return None
    reasons = [
        reason
        for estimate in quote.estimates
        if estimate.backend == backend and (not model or estimate.model == model)
        for reason in estimate.reasons
    ]
    why = "; ".join(dict.fromkeys(reasons)) or f"this mesh has no such {'model' if model else 'renderer'}"
    return (
        f"{offer_name(backend, model)} was asked for but does not qualify ({why}): "
        f"routing to {offer_name(quote.backend, quote.model)}"
    )


def _create(
    gateway: Gateway, request: gateway_pb2.CreateRenderJobRequest, interrupt: Interrupt
) -> gateway_pb2.RenderJob:
    """The created job. Raises the gateway's refusal (grpc.RpcError), or KeyboardInterrupt when Ctrl-C
    cancelled the call."""
    call = gateway.stub.CreateRenderJob.future(request, timeout=CALL_TIMEOUT_SECONDS)
    interrupt.waiting_on(call)
    try:
        return call.result().job
    except grpc.FutureCancelledError:
        interrupt.check()
        raise


def _keeps_running(job_id: str) -> str:
    return f"job {job_id} keeps running: `aiprod jobs watch {job_id}` follows it again"


def _still_in_review(job: gateway_pb2.RenderJob) -> str:
    return (
        f"job {job.job_id} still awaits approval: `aiprod jobs watch {job.job_id}` follows it, "
        f"`{approve_command(job.job_id, job.plan_version or 1)}` approves it"
    )


def _interrupted_at_the_end(job_id: str) -> RenderError:
    """Ctrl-C that came as the follow ended (a Ctrl-C while following says where it left the job)."""
    return RenderError(f"interrupted; `aiprod jobs watch {job_id}` shows how job {job_id} ended")


def follow_to_video(
    gateway: Gateway,
    job: gateway_pb2.RenderJob,
    out: Path | None,
    reporting: Callable[[], AbstractContextManager[Reporter]],
    review: ReviewReporter,
    interrupt: Interrupt,
    after_sequence: int,
) -> RenderResult:
    """Follows the job, as last read, through review (when it awaits approval) and its render until it
    ends, and returns the video. The render's follow starts after after_sequence.

    reporting opens the render's progress display, once the job is approved (at once without review).
    Raises RenderError when the job ended without a video or the CLI stopped following it (Ctrl-C,
    or the gateway gone for good), grpc.RpcError when the gateway refused a call.
    """
    in_review = job.state == job_pb2.JOB_STATE_AWAITING_APPROVAL
    state = job.state
    try:
        if in_review:
            reviewed = await_approval(gateway, job, review, interrupt)
            in_review = False
            state, after_sequence = reviewed.state, reviewed.after_sequence
        if state not in TERMINAL_STATES:
            with reporting() as reporter:
                for response in follow_job(
                    gateway,
                    job.job_id,
                    reporter.reconnecting,
                    after_sequence=after_sequence,
                    interrupt=interrupt,
                ):
                    reporter.show(response)
    except KeyboardInterrupt:
        raise RenderError(
            f"interrupted; {_still_in_review(job) if in_review else _keeps_running(job.job_id)}"
        ) from None
    except GatewayLost as lost:
        raise RenderError(f"{lost}; {_keeps_running(job.job_id)}") from None
    # The stream's last message says the job ended; the job itself has the result or the error.
    ended = gateway.stub.GetRenderJob(
        gateway_pb2.GetRenderJobRequest(job_id=job.job_id), timeout=CALL_TIMEOUT_SECONDS
    ).job
    if ended.state != job_pb2.JOB_STATE_SUCCEEDED:
        reason = reason_name(ended.error.reason) if ended.error.reason else "no reason given"
        raise RenderError(
            f"job {ended.job_id} {state_name(ended.state)}: {reason}: {ended.error.message}", ended
        )
    return RenderResult(ended, deliver_video(ended, out))


def render_video(
    address: str,
    api_key: str,
    request: gateway_pb2.CreateRenderJobRequest,
    out: Path | None,
    reporting: Callable[[], AbstractContextManager[Reporter]],
    review: ReviewReporter,
) -> RenderResult:
    """Creates the job and follows it to its video (`follow_to_video`).

    Raises RenderError when the job ended without a video or the CLI stopped following it,
    grpc.RpcError when the gateway refused a call.
    """
    with connect(address, api_key) as gateway:
        created: gateway_pb2.RenderJob | None = None
        try:
            with interruptible() as interrupt:
                created = _create(gateway, request, interrupt)
                if note := _preference_not_taken(request.spec.constraints, created.quote):
                    stderr.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
                # The created job shows its first events: the follow goes on after them.
                return follow_to_video(
                    gateway, created, out, reporting, review, interrupt, after_sequence=created.last_sequence
                )
        except KeyboardInterrupt:
            if created is None:
                # The gateway may have made the job: the same request id returns it rather than ordering
                # another.
                raise RenderError(
                    "interrupted before the gateway answered: the job may have been ordered; the same command "
                    f"with --request-id {request.request_id} returns it rather than ordering another"
                ) from None
            raise _interrupted_at_the_end(created.job_id) from None


def watch_video(
    address: str,
    api_key: str,
    job_id: str,
    out: Path | None,
    reporting: Callable[[], AbstractContextManager[Reporter]],
    review: ReviewReporter,
) -> RenderResult:
    """Follows a job made earlier, from its first event, to its video (`follow_to_video`)."""
    with connect(address, api_key) as gateway:
        job = gateway.stub.GetRenderJob(
            gateway_pb2.GetRenderJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_SECONDS
        ).job
        try:
            with interruptible() as interrupt:
                # From the first event: the story so far (where it was routed, each fallback), then the rest.
                return follow_to_video(gateway, job, out, reporting, review, interrupt, after_sequence=0)
        except KeyboardInterrupt:
            raise _interrupted_at_the_end(job_id) from None


def reporting_for(json_output: bool) -> Callable[[], AbstractContextManager[Reporter]]:
    """The render's progress display: none with --json (stdout carries only the result)."""

    def reporting() -> AbstractContextManager[Reporter]:
        return nullcontext(SilentReporter()) if json_output else progress_reporter(stderr)

    return reporting


def print_video_or_exit(
    gateway: str,
    json_output: bool,
    follow: Callable[[], RenderResult],
    extra: dict[str, object] | None = None,
) -> None:
    """Runs follow and prints its video's path (with --json, the job and its path); exits 1 when no video
    came out, 2 when the gateway refused a call."""
    extra = extra or {}
    try:
        with exit_on_rpc_error(gateway):
            result = follow()
    except RenderError as error:
        if json_output and error.job is not None:
            print_json({**job_to_dict(error.job), "video_path": None, **extra})
        stderr.print(str(error), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_RENDER_FAILED) from None
    if json_output:
        print_json({**job_to_dict(result.job), "video_path": result.video, **extra})
    else:
        print_line(result.video)


def render(
    prompt: PromptArgument,
    preset: PresetOption = None,
    duration: DurationOption = None,
    aspect_ratio: AspectRatioOption = None,
    resolution: ResolutionOption = None,
    backend: BackendOption = None,
    model: ModelOption = None,
    max_cost: MaxCostOption = None,
    first_frame: FirstFrameOption = None,
    reference_image: ReferenceImageOption = None,
    quality_floor: QualityFloorOption = None,
    deadline: DeadlineOption = None,
    seed: SeedOption = None,
    shot: ShotOption = None,
    continuous: ContinuousOption = False,
    out: Annotated[Path | None, typer.Option(metavar="FILE", help="Copy the video here.")] = None,
    request_id: Annotated[
        str | None, typer.Option(metavar="ID", help="Idempotency key (default: a fresh one).")
    ] = None,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="First show how the backends rank for this render, with the reasons (the gateway's quote "
            'for it: every backend\'s estimate; with --json, under "explain").',
        ),
    ] = False,
    review: Annotated[
        bool,
        typer.Option(
            "--review",
            help="Wait for approval before rendering, as the presets with an approval step "
            "(brand_campaign, premium_spot) always do: the plan and the quote are shown with the command "
            "that approves them, then the render is followed once approved.",
        ),
    ] = False,
    quote_id: Annotated[
        str,
        typer.Option(
            metavar="QUOTE",
            help="Hold the job to this quote (`aiprod quote` with the same prompt and options): its route "
            "and price, or a refusal saying why it no longer holds.",
        ),
    ] = "",
    gateway: GatewayOption = DEFAULT_GATEWAY,
    api_key: ApiKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Render a video: create the job, follow its progress and print the video's path.

    A job in review (its preset's approval step, or --review) shows its plan and quote and how to approve
    them, and is followed once approved (`aiprod jobs approve`, from anywhere).

    Exits 1 when the job fails or is cancelled, 2 when the gateway refuses the request.

    Ctrl-C stops following the job but leaves it running (or waiting for approval); `aiprod jobs watch`
    follows it again.
    """
    require_key(api_key)
    spec = build_spec(
        prompt,
        preset=preset,
        duration=duration,
        aspect_ratio=aspect_ratio,
        resolution=resolution,
        backend=backend,
        model=model,
        max_cost=max_cost,
        quality_floor=quality_floor,
        deadline=deadline,
        seed=seed,
        first_frame=first_frame,
        reference_images=reference_image,
        shots=shot,
        continuous=continuous,
    )
    # With --explain, the JSON has "explain": the estimates, or null when the gateway gave none.
    extra: dict[str, object] = {}
    if explain:
        estimates = explain_route(spec, gateway, api_key)
        extra["explain"] = None if estimates is None else [message_to_dict(e) for e in estimates]
        if estimates is not None and not json_output:
            stderr.print(estimates_table(estimates, title="Route plan"))

    request = gateway_pb2.CreateRenderJobRequest(
        request_id=request_id or uuid.uuid4().hex, spec=spec, quote_id=quote_id.strip(), review=review
    )
    print_video_or_exit(
        gateway,
        json_output,
        lambda: render_video(
            gateway,
            api_key,
            request,
            out,
            reporting_for(json_output),
            ReviewReporter(stderr, brief=json_output),
        ),
        extra,
    )
