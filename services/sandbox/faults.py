"""Injected faults: rules queued through the control API, matched against each provider request.

A rule names a provider ("runway", "veo", "replicate" or "*"), an operation ("create", "get",
"cancel", "download" or "*") and a kind. It fires `times` times, or, when `rate` is given (`times`
is then ignored), on that share of the matching requests for as long as it is queued. Rules are tried
in the order they were added; a used-up rule stays listed with `remaining: 0`.

Kinds: "429" (with `Retry-After: <retry_after>` when retry_after is given, none otherwise), "5xx"
(`status`, 503 by default), "401", "403" and "400", each with the provider's own error body; "hang"
holds the request for `hang_seconds` (3600 by default) and then lets it go on, so a short hang is a slow
answer; "drop" closes the connection without any HTTP response. By default a fault acts before the request is handled, as a front proxy would: a refused create
creates nothing. With `"phase": "after"` it acts once the request was handled: the task exists but the
client gets the fault instead of the answer (a lost response).
"""

import asyncio
import random
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from aiprod_sandbox.config import PROVIDERS

KINDS = ("429", "5xx", "hang", "drop", "401", "403", "400")
# "account": the cheap authenticated reads renderers probe with (organization, account).
OPERATIONS = ("create", "get", "cancel", "download", "account")
PHASES = ("before", "after")


class ErrorFormat(Protocol):
    """A provider's error response: its JSON body shape for a status, with an optional message."""

    def __call__(self, status: int, message: str | None = None) -> web.Response: ...


class FaultError(ValueError):
    """A fault rule that cannot be queued."""


@dataclass
class FaultRule:
    id: int
    provider: str
    operation: str
    kind: str
    times: int
    rate: float | None
    retry_after: float | None
    status: int
    hang_seconds: float
    phase: str
    fired: int = 0

    def matches(self, provider: str, operation: str, phase: str) -> bool:
        return (
            self.provider in ("*", provider)
            and self.operation in ("*", operation)
            and self.phase == phase
            and (self.rate is not None or self.fired < self.times)
        )

    def as_json(self) -> dict[str, Any]:
        remaining = None if self.rate is not None else self.times - self.fired
        return {
            "id": self.id,
            "provider": self.provider,
            "operation": self.operation,
            "kind": self.kind,
            "times": self.times,
            "rate": self.rate,
            "retry_after": self.retry_after,
            "status": self.status,
            "hang_seconds": self.hang_seconds,
            "phase": self.phase,
            "fired": self.fired,
            "remaining": remaining,
        }


def _choice(payload: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = payload.get(key, default)
    if value not in allowed:
        raise FaultError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _number(payload: dict[str, Any], key: str, default: float | None) -> float | None:
    value = payload.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise FaultError(f"{key} must be a non-negative number, not {value!r}")
    return float(value)


class FaultBook:
    """The queued rules. Only touched from the event loop, so it needs no lock."""

    _FIELDS = frozenset(
        {"provider", "operation", "kind", "times", "rate", "retry_after", "status", "hang_seconds", "phase"}
    )

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self._next_id = 1

    def add(self, payload: Any) -> FaultRule:
        if not isinstance(payload, dict):
            raise FaultError("a fault rule is a JSON object")
        unknown = set(payload) - self._FIELDS
        if unknown:
            raise FaultError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        if "kind" not in payload:
            raise FaultError("kind is required")
        times = payload.get("times", 1)
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise FaultError(f"times must be a positive integer, not {times!r}")
        rate = _number(payload, "rate", None)
        if rate is not None and rate > 1:
            raise FaultError("rate is a probability between 0 and 1")
        status = payload.get("status", 503)
        kind = _choice(payload, "kind", KINDS, "")
        # Only a "5xx" fault answers with `status`; the others carry their code in their kind.
        if kind == "5xx" and (
            isinstance(status, bool) or not isinstance(status, int) or not 500 <= status <= 599
        ):
            raise FaultError(f"status must be a 5xx code, not {status!r}")
        rule = FaultRule(
            id=self._next_id,
            provider=_choice(payload, "provider", (*PROVIDERS, "*"), "*"),
            operation=_choice(payload, "operation", (*OPERATIONS, "*"), "*"),
            kind=kind,
            times=times,
            rate=rate,
            retry_after=_number(payload, "retry_after", None),
            status=status,
            hang_seconds=_number(payload, "hang_seconds", 3600.0) or 0.0,
            phase=_choice(payload, "phase", PHASES, "before"),
        )
        self._next_id += 1
        self._rules.append(rule)
        return rule

    def take(self, provider: str, operation: str, phase: str) -> FaultRule | None:
        """The first rule that fires for this request, counted as fired; None when none does."""
        for rule in self._rules:
            if not rule.matches(provider, operation, phase):
                continue
            if rule.rate is not None and random.random() >= rule.rate:
                continue
            rule.fired += 1
            return rule
        return None

    def rules(self) -> list[FaultRule]:
        return list(self._rules)

    def clear(self) -> None:
        self._rules.clear()


def _retry_after_header(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else str(seconds)


async def enact(rule: FaultRule, request: web.Request, errors: ErrorFormat) -> web.StreamResponse | None:
    """What the client gets for a fired rule; None when the request goes on (a hang that ended)."""
    match rule.kind:
        case "429":
            response = errors(429)
            if rule.retry_after is not None:
                response.headers["Retry-After"] = _retry_after_header(rule.retry_after)
            return response
        case "5xx":
            return errors(rule.status)
        case "401" | "403" | "400":
            return errors(int(rule.kind))
        case "hang":
            # The client's timeout usually ends it first: the server cancels the handler on disconnect.
            await asyncio.sleep(rule.hang_seconds)
            return None
        case "drop":
            # No status line, no body: the client sees the connection closed under its request.
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError
    raise AssertionError(f"unhandled fault kind {rule.kind}")
