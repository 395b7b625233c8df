"""Every request a renderer makes to its provider: under the provider's limits, measured, and traced in
the render it serves (`ProviderLimits` decides what is retried, `ProviderCallMetrics` measures).

Invariant: no provider request is sent any other way, so that limits, Retry-After pauses and metrics
see all of them.
"""

from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiprod_kit.rendering.limits import ProviderLimits
from aiprod_kit.rendering.record import ProviderRender
from aiprod_kit.rendering.telemetry import ProviderCallMetrics

T = TypeVar("T")


class ProviderCalls:
    def __init__(self, limits: ProviderLimits, metrics: ProviderCallMetrics) -> None:
        self.limits = limits
        self._metrics = metrics

    async def call(
        self,
        render: ProviderRender | None,
        operation: Callable[[], Awaitable[T]],
        *,
        idempotent: bool,
        what: str,
        timeout: float | None = None,
        within: float | None = None,
    ) -> T:
        """One provider call under the limits, measured, in the trace of the render it serves."""
        with self._metrics.call(what, render.trace_context if render else None):
            return await self.limits.call(
                operation, idempotent=idempotent, what=what, timeout=timeout, within=within
            )
