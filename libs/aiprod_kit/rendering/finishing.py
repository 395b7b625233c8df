"""Finishing an output: a finished video copied to durable storage, decoded and checked (technical QC),
in that order, before anyone is told the render succeeded.

Invariants: a provider's output is copied within the download timeout, rate limits and transient
errors waited out meanwhile (its URL expires); an output that cannot be copied, decoded, stored or
checked yields a failure with its own reason (never an exception that would leave the render
RUNNING). What QC checks against is the request when it is known, else the video's own length and size
(a render re-attached without its request).
"""

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog

from aiprod.common.v1 import render_pb2
from aiprod_kit.failures import Reason, failure
from aiprod_kit.rendering import qc
from aiprod_kit.rendering.calls import ProviderCalls
from aiprod_kit.rendering.provider import Provider, ProviderError, ProviderTask
from aiprod_kit.rendering.record import ProviderRender
from aiprod_kit.rendering.storage import StoredVideo, VideoStore, scratch_directory

log = structlog.get_logger()


def check(
    facts: qc.Probe,
    shot: render_pb2.Shot,
    *,
    frame_size: Callable[[render_pb2.Shot], tuple[int, int]],
    frame_rate: float,
    exact_size: bool,
) -> render_pb2.QcReport:
    """QC of a decoded output against its shot; frame_size: the size the backend makes for a shot."""
    if not shot.duration_seconds:
        # Re-attached after a restart: the request is unknown here, so the output is checked for
        # black and frozen frames against its own duration and size.
        (width, height), duration = (facts.width, facts.height), facts.duration_seconds
    else:
        (width, height), duration = frame_size(shot), shot.duration_seconds
    return qc.report(
        facts,
        duration_seconds=duration,
        width=width,
        height=height,
        frame_rate=frame_rate,
        exact_size=exact_size,
    )


def render_output(
    backend: int, stored: StoredVideo, facts: qc.Probe, report: render_pb2.QcReport
) -> render_pb2.RenderOutput:
    """A stored, checked video as a render's output (its cost is set by whoever knows the charge)."""
    return render_pb2.RenderOutput(
        backend=backend,
        video=render_pb2.VideoArtifact(
            uri=stored.uri,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            mime_type="video/mp4",
            duration_seconds=facts.duration_seconds,
            width=facts.width,
            height=facts.height,
            frame_rate=facts.frame_rate,
            frame_count=facts.frame_count,
        ),
        qc=report,
    )


class OutputFinisher:
    """A provider's finished task made into a durable, checked output."""

    def __init__(
        self,
        provider: Provider,
        calls: ProviderCalls,
        store: VideoStore,
        work_dir: Path,
        download_timeout_seconds: float,
        qc_concurrency: int = 1,
    ) -> None:
        self._provider = provider
        # Decodes at once: a decode keeps a core busy and holds its frames (tens of MB at 720p).
        self._decoding = asyncio.Semaphore(qc_concurrency)
        self._calls = calls
        self._store = store
        self._work_dir = work_dir
        self._download_timeout = download_timeout_seconds
        self._log = log.bind(backend=provider.name)

    async def finish(
        self, render: ProviderRender, task: ProviderTask
    ) -> render_pb2.RenderOutput | render_pb2.RenderFailure:
        """The task's output, copied, stored and checked; or why it could not be. Sets the render's
        output_seconds once the output is decoded (it prices a render re-attached without its shot)."""
        if not task.outputs:
            return failure(Reason.PROVIDER_NO_OUTPUT, "no video in the result", True)
        async with scratch_directory(self._work_dir) as scratch:
            local = scratch / "output.mp4"
            try:
                # Rate limits and transient errors are waited out for as long as the download may take.
                await self._calls.call(
                    render,
                    lambda: self._provider.download(task.outputs[0], local),
                    idempotent=True,
                    what="download",
                    timeout=self._download_timeout,
                    within=self._download_timeout,
                )
            except ProviderError as error:
                self._log.warning("output not copied", task_id=render.task_id, error=str(error))
                return failure(Reason.OUTPUT_LOST, str(error), False)
            task.outputs[0].data.clear()  # copied: see VideoSource.data
            try:
                async with self._decoding:
                    facts = await asyncio.to_thread(qc.probe, local)
            except qc.DecodeError as error:
                return failure(Reason.OUTPUT_UNDECODABLE, f"the output: {error}", True)
            render.output_seconds = facts.duration_seconds
            try:
                stored = await self._store.put(local)
            except Exception as error:
                self._log.exception("output not stored", task_id=render.task_id)
                return failure(Reason.OUTPUT_STORE_FAILED, f"the output could not be stored: {error}", True)
        try:
            # Providers deliver standard sizes of the asked ratio (1080p for 720p is no fault).
            report = check(
                facts,
                render.shot,
                frame_size=self._provider.frame_size,
                frame_rate=self._provider.frame_rate,
                exact_size=False,
            )
        except Exception as error:
            self._log.exception("output not checked", task_id=render.task_id)
            return failure(
                Reason.OUTPUT_CHECK_FAILED, f"the output could not be checked: {type(error).__name__}", True
            )
        self._log.info("render stored", task_id=render.task_id, uri=stored.uri, qc=round(report.score, 3))
        return render_output(self._provider.backend, stored, facts, report)
