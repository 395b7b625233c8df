"""Simulated render tasks, shared by the three providers: their life on a clock and their videos.

Each task runs as a background coroutine: it may wait (a `[sandbox:throttle]` prompt, or the
provider's concurrency limit), then runs for `render_seconds` while its video is encoded in a worker
thread (or found in the cache: each distinct video is encoded once, video_cache.py), and succeeds only
once both the time has passed and the MP4 is on disk. Progress follows the
elapsed share of render_seconds through the configured curve, held below 1 until the task is done.
The providers only translate a task's state into their own wire format.
"""

import asyncio
import collections
import contextlib
import enum
import functools
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from aiprod.common.v1 import render_pb2
from aiprod_renderers.local import synth
from aiprod_sandbox.config import PROVIDERS, ProviderConfig, RuntimeConfig
from aiprod_sandbox.video_cache import VideoCache

log = structlog.get_logger()

_ASPECT_RATIOS = {
    "16:9": render_pb2.ASPECT_RATIO_16_9,
    "9:16": render_pb2.ASPECT_RATIO_9_16,
    "1:1": render_pb2.ASPECT_RATIO_1_1,
}
ASPECT_RATIOS = tuple(_ASPECT_RATIOS)
# The progress reported while a task runs never reaches 1: only a finished task is complete.
_MAX_RUNNING_PROGRESS = 0.99


def video_size(aspect_ratio: str, short_side: int = 720) -> tuple[int, int]:
    """(width, height) of the local renderer's frame for that ratio, scaled to the short side (even)."""
    width, height = synth.frame_size(_ASPECT_RATIOS[aspect_ratio])
    scale = short_side / min(width, height)
    return 2 * round(width * scale / 2), 2 * round(height * scale / 2)


class Outcome(enum.Enum):
    SUCCEED = "succeed"
    SAFETY = "safety"
    FAIL = "fail"
    NEVER = "never"


@dataclass(frozen=True)
class Triggers:
    outcome: Outcome = Outcome.SUCCEED
    throttle: bool = False


def read_triggers(prompt: str) -> Triggers:
    """The `[sandbox:...]` words in a prompt; safety wins over fail, fail over never."""
    outcome = next(
        (o for o in (Outcome.SAFETY, Outcome.FAIL, Outcome.NEVER) if f"[sandbox:{o.value}]" in prompt),
        Outcome.SUCCEED,
    )
    return Triggers(outcome=outcome, throttle="[sandbox:throttle]" in prompt)


@dataclass(frozen=True)
class RenderSpec:
    """What to render: one video per sample, the n-th with seed + n."""

    prompt: str
    seed: int
    duration_seconds: float
    width: int
    height: int
    samples: int = 1


class Phase(enum.Enum):
    PENDING = "pending"
    THROTTLED = "throttled"  # waiting for a concurrency slot or a throttle trigger
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED})


class Failure(enum.Enum):
    SAFETY = "safety"
    INTERNAL = "internal"
    TIMEOUT = "timeout"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Job:
    """One provider task. Its fields change only on the event loop."""

    id: str
    provider: str
    spec: RenderSpec
    triggers: Triggers
    # The configuration when the task was created: later changes apply to later tasks.
    config: ProviderConfig
    idempotency_key: str
    # The request as the provider received it, in the provider module's own type.
    details: object = None
    created_at: datetime = field(default_factory=_now)
    phase: Phase = Phase.PENDING
    started_at: datetime | None = None
    completed_at: datetime | None = None
    failure: Failure | None = None
    videos: list[Path] = field(default_factory=list)
    _started: float | None = None
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: asyncio.Task[None] | None = None
    # Called once, when the task reaches its final state (the provider's bill is settled then).
    _on_final: Callable[["Job"], None] | None = None

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def progress(self) -> float:
        if self.phase is Phase.SUCCEEDED:
            return 1.0
        if self.phase is not Phase.RUNNING or self._started is None:
            return 0.0
        render_seconds = self.config.render_seconds
        share = min((time.monotonic() - self._started) / render_seconds, 1.0) if render_seconds else 1.0
        if self.config.progress_curve == "ease_out":
            share = 1 - (1 - share) ** 2
        return round(min(share, _MAX_RUNNING_PROGRESS), 4)

    @property
    def seconds_since_completion(self) -> float:
        return (_now() - self.completed_at).total_seconds() if self.completed_at else 0.0

    async def wait_done(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), timeout)

    def _finish(self, phase: Phase, failure: Failure | None = None) -> None:
        if self.terminal:
            return
        self.phase, self.failure, self.completed_at = phase, failure, _now()
        self._done.set()
        if self._on_final is not None:
            self._on_final(self)


class Slots:
    """A provider's concurrency limit: first come, first served; the limit is read anew at each turn."""

    def __init__(self, provider: str, config: RuntimeConfig) -> None:
        self._provider = provider
        self._config = config
        self._running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def _has_room(self) -> bool:
        limit = self._config.of(self._provider).max_concurrent
        return limit is None or self._running < limit

    async def acquire(self, job: Job) -> None:
        if not self._waiters and self._has_room():
            self._running += 1
            return
        job.phase = Phase.THROTTLED
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as the task was cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self._running -= 1
        self.hand_over()

    def hand_over(self) -> None:
        """Gives free slots to the longest waiting tasks (after a release or a higher limit)."""
        while self._waiters and self._has_room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._running += 1
                waiter.set_result(None)


class TaskBoard:
    """Every provider's tasks, their runners, and the files they render under `directory`."""

    def __init__(
        self,
        directory: Path,
        config: RuntimeConfig,
        on_final: Callable[[Job], None] | None = None,
        video_short_side: int = 0,
    ) -> None:
        self._directory = directory
        # Every video at this shorter side instead of the provider's (0: the provider's).
        self._video_short_side = video_short_side
        self._config = config
        self._on_final = on_final
        self._jobs: dict[str, dict[str, Job]] = {provider: {} for provider in PROVIDERS}
        self._slots = {provider: Slots(provider, config) for provider in PROVIDERS}
        self._videos = VideoCache(directory / "cache", concurrency=os.cpu_count() or 1)

    def submit(self, provider: str, job_id: str, spec: RenderSpec, key: str, details: object = None) -> Job:
        job = Job(job_id, provider, spec, read_triggers(spec.prompt), self._config.of(provider), key, details)
        job._on_final = self._on_final
        self._jobs[provider][job_id] = job
        job._runner = asyncio.create_task(self._run(job), name=f"{provider}-{job_id}")
        return job

    def get(self, provider: str, job_id: str) -> Job | None:
        return self._jobs[provider].get(job_id)

    def jobs(self, provider: str) -> list[Job]:
        return list(self._jobs[provider].values())

    def cancel(self, job: Job) -> bool:
        """Stops a task that has not finished; False when it already had."""
        if job.terminal:
            return False
        job._finish(Phase.CANCELLED)
        if job._runner is not None:
            job._runner.cancel()
        return True

    def cancel_later(self, job: Job, seconds: float) -> None:
        asyncio.get_running_loop().call_later(seconds, self.cancel, job)

    def forget(self, job: Job) -> None:
        """Deletes a finished task and its files."""
        self._jobs[job.provider].pop(job.id, None)
        for video in job.videos:
            video.unlink(missing_ok=True)

    def limits_changed(self) -> None:
        for slots in self._slots.values():
            slots.hand_over()

    async def reset(self) -> None:
        """Stops every task and deletes every task and file."""
        jobs = [job for provider in PROVIDERS for job in self._jobs[provider].values()]
        for job in jobs:
            self.cancel(job)
        await asyncio.gather(*(job._runner for job in jobs if job._runner), return_exceptions=True)
        for provider in PROVIDERS:
            self._jobs[provider].clear()
        self._videos.clear()
        await asyncio.to_thread(shutil.rmtree, self._directory, True)

    async def _run(self, job: Job) -> None:
        try:
            if job.triggers.outcome is Outcome.SAFETY:
                # Input moderation refuses the prompt before the task gets any render time.
                job._finish(Phase.FAILED, Failure.SAFETY)
                return
            if job.triggers.throttle:
                job.phase = Phase.THROTTLED
                await asyncio.sleep(job.config.throttle_seconds)
            slots = self._slots[job.provider]
            await slots.acquire(job)
            try:
                await self._render(job)
            finally:
                slots.release()
        except asyncio.CancelledError:
            job._finish(Phase.CANCELLED)
        except Exception:
            log.exception("render_failed", provider=job.provider, task_id=job.id)
            job._finish(Phase.FAILED, Failure.INTERNAL)

    async def _render(self, job: Job) -> None:
        job.phase, job.started_at, job._started = Phase.RUNNING, _now(), time.monotonic()
        config = job.config
        match job.triggers.outcome:
            case Outcome.NEVER:
                if config.max_run_seconds is None:
                    await asyncio.Event().wait()  # until cancelled
                else:
                    await asyncio.sleep(config.max_run_seconds)
                    job._finish(Phase.FAILED, Failure.TIMEOUT)
            case Outcome.FAIL:
                await asyncio.sleep(config.render_seconds / 2)
                job._finish(Phase.FAILED, Failure.INTERNAL)
            case _:
                await asyncio.gather(asyncio.sleep(config.render_seconds), self._encode(job))
                job._finish(Phase.SUCCEEDED)
        log.info("task_finished", provider=job.provider, task_id=job.id, phase=job.phase.value)

    async def _encode(self, job: Job) -> None:
        spec = job.spec
        directory = self._directory / job.provider
        width, height = _scaled(spec.width, spec.height, self._video_short_side)
        for sample in range(spec.samples):
            path = directory / f"{job.id}-{sample}.mp4"
            seed = spec.seed + sample
            encode = functools.partial(_encode_file, spec=spec, seed=seed, width=width, height=height)
            key = VideoCache.key(spec.prompt, seed, spec.duration_seconds, width, height)
            await self._videos.place(key, path, encode)
            job.videos.append(path)


def _scaled(width: int, height: int, short_side: int) -> tuple[int, int]:
    """The size with its shorter side at short_side (even, as H.264's chroma needs); 0: unchanged."""
    if not short_side:
        return width, height
    scale = short_side / min(width, height)
    return max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))


def _encode_file(path: Path, spec: RenderSpec, seed: int, width: int, height: int) -> None:
    synth.encode_video(path, spec.prompt, seed, spec.duration_seconds, width, height)
