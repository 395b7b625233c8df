"""One render as a renderer knows it: its status, the changes its watchers wait on, its watch stream.

Invariants: every change to the status moves its update time and wakes every watcher at once; a watch
sends the status as it is, then each change, and ends after the first terminal status it sent (a
change while a message is being sent is never missed). A render's ending is made by the registry
(`RenderRegistry.end`), once.
"""

import asyncio
from collections.abc import AsyncIterator

from opentelemetry import context as otel_context

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.rendering.keys import KeyRecord
from aiprod_kit.rendering.provider import ProviderTask

TERMINAL_STATES = frozenset(
    {
        renderer_pb2.RENDER_STATE_SUCCEEDED,
        renderer_pb2.RENDER_STATE_FAILED,
        renderer_pb2.RENDER_STATE_CANCELLED,
    }
)


class RenderRecord:
    """One render at this renderer: its status and the event its watchers wait on."""

    def __init__(self, key: str, shot: render_pb2.Shot, model: str, backend: int, task_id: str = "") -> None:
        self.shot = shot
        self.model = model
        # A task slot this render holds until it ends, if any.
        self.slot: asyncio.Semaphore | None = None
        # Its end is being recorded: known to this process, not announced yet.
        self.concluding = False
        self._changed = asyncio.Event()
        self.status = renderer_pb2.Render(
            handle=backend_pb2.RenderHandle(backend=backend, task_id=task_id, idempotency_key=key),
            state=renderer_pb2.RENDER_STATE_PENDING,
            model=model,
        )
        self.status.create_time.GetCurrentTime()
        self.status.update_time.CopyFrom(self.status.create_time)

    @property
    def key(self) -> str:
        return self.status.handle.idempotency_key

    @property
    def task_id(self) -> str:
        return self.status.handle.task_id

    @property
    def ended(self) -> bool:
        return self.status.state in TERMINAL_STATES

    def snapshot(self) -> renderer_pb2.Render:
        copy = renderer_pb2.Render()
        copy.CopyFrom(self.status)
        return copy

    def next_change(self) -> asyncio.Event:
        """The event set at the status's next change."""
        return self._changed

    def changed(self) -> None:
        self.status.update_time.GetCurrentTime()
        self._changed.set()
        self._changed = asyncio.Event()

    def update(self, state: int, progress: float) -> None:
        """A render going on: its state and progress, announced when they moved; nothing once ended
        (progress can arrive after a cancel has ended the render)."""
        if self.ended or (self.status.state, self.status.progress) == (state, progress):
            return
        self.status.state = state
        self.status.progress = progress
        self.changed()

    def restore(self, ended: renderer_pb2.Render) -> None:
        """Takes an ending (as made by the registry, or as the key store kept it) and announces it."""
        self.status.CopyFrom(ended)
        self.changed()

    def release_slot(self) -> None:
        if self.slot is not None:
            slot, self.slot = self.slot, None
            slot.release()

    async def watch(self) -> AsyncIterator[renderer_pb2.Render]:
        """The status now, then at each change, until the render has ended."""
        while True:
            # Taken before the snapshot, so that a change while the message is sent is not missed.
            change = self.next_change()
            status = self.snapshot()
            yield status
            if status.state in TERMINAL_STATES:
                return
            await change.wait()


class ProviderRender(RenderRecord):
    """A render whose task runs at a provider: what starting, polling and billing it need to know."""

    def __init__(self, key: str, shot: render_pb2.Shot, model: str, backend: int) -> None:
        super().__init__(key, shot, model, backend)
        # When the poll loop next asks the provider (monotonic seconds); 0: not scheduled, or in flight.
        self.next_poll = 0.0
        # Polls scheduled so far, and when the first was (monotonic): the next waits longer.
        self.polls = 0
        self.polling_since = 0.0
        # Set once StartRender's answer is known; abandoned: its caller went away before anything was
        # sent, so a later call under the key starts afresh.
        self.created = asyncio.Event()
        self.abandoned = False
        # The task as last seen at the provider, and the output's length once probed: for the charge.
        self.last_task: ProviderTask | None = None
        self.output_seconds = 0.0
        # The trace of the call that made this render (StartRender, or a watch after a restart): its
        # polls and download join it.
        self.trace_context = otel_context.get_current()

    def restore(self, ended: renderer_pb2.Render) -> None:
        super().restore(ended)
        # The provider's last answer priced the ending and is not needed since; it may hold the video
        # itself (Veo's inline bytes).
        self.last_task = None

    def adopt(self, record: KeyRecord) -> None:
        """Takes the request as the key store kept it (after a restart, or from another replica)."""
        self.shot = record.shot
        self.model = record.model
        self.status.model = record.model
        self.status.handle.idempotency_key = record.idempotency_key
