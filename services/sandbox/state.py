"""The sandbox's state shared by every route, and the steps every provider request goes through."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from aiprod_sandbox.billing import Billing
from aiprod_sandbox.config import RuntimeConfig, default_configs
from aiprod_sandbox.counters import Counters
from aiprod_sandbox.faults import ErrorFormat, FaultBook, enact
from aiprod_sandbox.outputs import OutputStore
from aiprod_sandbox.tasks import TaskBoard

log = structlog.get_logger()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A provider's credential check: None when the request may go on, else the provider's refusal.
AuthCheck = Callable[[web.Request], web.Response | None]


def idempotency_key(request: web.Request) -> str:
    return request.headers.get("Idempotency-Key", "")


def bearer_token(request: web.Request, schemes: tuple[str, ...] = ("Bearer",)) -> str | None:
    """The credential of the Authorization header, None when there is none."""
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    return (credential.strip() or None) if scheme in schemes else None


@dataclass
class Sandbox:
    accepted_keys: frozenset[str]
    config: RuntimeConfig
    counters: Counters
    billing: Billing
    faults: FaultBook
    outputs: OutputStore
    tasks: TaskBoard

    @classmethod
    def create(
        cls, data_dir: Path, render_seconds: float, accepted_keys: frozenset[str], video_short_side: int = 0
    ) -> "Sandbox":
        config = RuntimeConfig(default_configs(render_seconds))
        billing = Billing()
        return cls(
            accepted_keys,
            config,
            Counters(),
            billing,
            FaultBook(),
            OutputStore(),
            TaskBoard(data_dir / "sandbox", config, billing.settle, video_short_side),
        )

    def configure(self, payload: object) -> None:
        """Applies a control request's configuration change (ConfigError when it is invalid)."""
        self.config.update(payload)
        self.tasks.limits_changed()  # a higher max_concurrent lets waiting tasks run now

    async def reset(self) -> None:
        await self.tasks.reset()  # cancels what runs, which settles bills: cleared just after
        self.counters.clear()
        self.billing.clear()
        self.faults.clear()
        self.outputs.clear()
        self.config.reset()

    def endpoint(
        self, provider: str, operation: str, errors: ErrorFormat, auth: AuthCheck, handler: Handler
    ) -> Handler:
        """The handler behind the steps every request takes: counting, faults, credentials."""

        async def handle(request: web.Request) -> web.StreamResponse:
            self.counters.request(provider, operation)
            if operation == "create":
                self.counters.create_request(provider, idempotency_key(request))
            refused = await self._fault(request, provider, operation, "before", errors)
            if refused is not None:
                return refused
            refused = auth(request)
            if refused is not None:
                return refused
            response = await handler(request)
            return await self._fault(request, provider, operation, "after", errors) or response

        return handle

    async def _fault(
        self, request: web.Request, provider: str, operation: str, phase: str, errors: ErrorFormat
    ) -> web.StreamResponse | None:
        rule = self.faults.take(provider, operation, phase)
        if rule is None:
            return None
        log.info("fault", provider=provider, operation=operation, kind=rule.kind, rule=rule.id, phase=phase)
        return await enact(rule, request, errors)
