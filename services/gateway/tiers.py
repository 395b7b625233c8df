"""SLA tiers: what each tier promises and allows, from configuration (AIPROD_GATEWAY_TIERS).

Defaults are the product's first version's figures (`shared/design/SEED.md`). AIPROD_GATEWAY_TIERS is
JSON overriding any of them, for instance `{"GOLD": {"concurrent_jobs": 20}}`.
"""

import json
from dataclasses import dataclass, fields, replace

from aiprod.gateway.v1 import admin_pb2
from aiprod_kit.settings import ConfigurationError


@dataclass(frozen=True)
class TierPolicy:
    # The job's deadline from its creation, unless the request sets a sooner one.
    latency_seconds: float
    # The floor the router must meet; an output under it earns one free re-render.
    quality_minimum: float
    # What the tier aims at (reported, not enforced).
    quality_target: float
    # Jobs queued or running at once (a job awaiting approval does not count).
    concurrent_jobs: int
    # Calls a minute, whatever the call.
    requests_per_minute: int
    # The longest video.
    max_duration_seconds: float


DEFAULT_TIERS: dict[int, TierPolicy] = {
    admin_pb2.SLA_TIER_BRONZE: TierPolicy(300, 0.6, 0.7, 2, 10, 30),
    admin_pb2.SLA_TIER_GOLD: TierPolicy(900, 0.7, 0.8, 10, 50, 120),
    admin_pb2.SLA_TIER_PLATINUM: TierPolicy(300, 0.9, 0.95, 50, 500, 180),
}


def parse_tiers(raw: str) -> dict[int, TierPolicy]:
    """The tiers with AIPROD_GATEWAY_TIERS's overrides applied; ConfigurationError names what is wrong."""
    tiers = dict(DEFAULT_TIERS)
    if not raw.strip():
        return tiers
    try:
        overrides = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"AIPROD_GATEWAY_TIERS is not JSON: {error}") from error
    if not isinstance(overrides, dict):
        raise ConfigurationError("AIPROD_GATEWAY_TIERS must be a JSON object of tier names")
    names = {field.name: field.type for field in fields(TierPolicy)}
    for name, values in overrides.items():
        tier = admin_pb2.SlaTier.Value(f"SLA_TIER_{name.upper()}") if _known(name) else None
        if tier is None or tier == admin_pb2.SLA_TIER_UNSPECIFIED:
            raise ConfigurationError(f"AIPROD_GATEWAY_TIERS: unknown tier {name!r} (BRONZE, GOLD, PLATINUM)")
        if not isinstance(values, dict) or not set(values) <= set(names):
            raise ConfigurationError(f"AIPROD_GATEWAY_TIERS.{name}: an object of {', '.join(sorted(names))}")
        for key, value in values.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ConfigurationError(f"AIPROD_GATEWAY_TIERS.{name}.{key}: a number, at least 0")
        tiers[tier] = replace(tiers[tier], **values)
    return tiers


def _known(name: str) -> bool:
    return f"SLA_TIER_{name.upper()}" in admin_pb2.SlaTier.keys()
