"""Ctrl-C while the CLI follows a job: it ends the wait at once, and is raised where the CLI's own code
runs rather than wherever the main thread happened to be.

Python's default handler raises KeyboardInterrupt at the next bytecode of the main thread, which may be
inside grpc's stream iteration or rich's display while they hold a lock; a lock left held there made
the CLI's exit wait forever. grpc's own cancellation example cancels the call from the handler instead,
as this does.
"""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Protocol


class Cancellable(Protocol):
    """A call or future the CLI waits on."""

    def cancel(self) -> bool: ...


class Interrupt:
    """The first Ctrl-C cancels what the CLI waits on (the job's stream, a wait for the gateway) and
    `check` raises KeyboardInterrupt at the next point the CLI checks. A second Ctrl-C raises at once, as
    Python's own handler does: the way out of a wait nothing here cancels."""

    def __init__(self) -> None:
        self.requested = False
        self._waited_on: Cancellable | None = None

    def waiting_on(self, cancellable: Cancellable) -> None:
        """What the next Ctrl-C cancels (cancelled at once if one came already)."""
        self._waited_on = cancellable
        if self.requested:
            cancellable.cancel()

    def check(self) -> None:
        """Raises KeyboardInterrupt if Ctrl-C came."""
        if self.requested:
            raise KeyboardInterrupt

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self._waited_on is not None:
            self._waited_on.cancel()


@contextmanager
def interruptible() -> Iterator[Interrupt]:
    """Ctrl-C handled by an Interrupt inside the block; on leaving it, KeyboardInterrupt if one came
    that nothing raised.

    Only the main thread gets signals: elsewhere the Interrupt is never requested.
    """
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return
    previous = signal.signal(signal.SIGINT, interrupt.on_sigint)
    try:
        yield interrupt
    finally:
        # None: a handler not set from Python; Python's own is the one to put back.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    interrupt.check()
