"""The presets a job can use (carried over from the product's first version), with price limits that hold
today.

Names, quality floors, durations, the approval step and the priority are the first version's
(`shared/design/SEED.md`). Its prices (0.50, 0.95 and 1.50 USD a minute) were under every provider's
today, so the limits are derived again from current public list prices, each high enough that at least
one backend meets the preset's floor within it at the preset's default duration, with the renderers'
default models:

| backend (default model)          | USD/s       | USD/min       | nominal quality | durations  |
|----------------------------------|-------------|---------------|-----------------|------------|
| Replicate (minimax/video-01)     | 0.05        | 3.00          | 0.75            | 6 s only   |
| Runway (gen4.5, 12 credits/s)    | 0.12        | 7.20          | 0.95            | 2-10 s     |
| Veo on Vertex AI (veo-3.0)       | 0.20 / 0.40 | 12.00 / 24.00 | 0.92            | 4, 6, 8 s  |
|                                  | (silent / with audio)       |                 |            |
| local                            | 0           | 0             | 0.5: a development stand-in          |

- quick_social (floor 0.6, 5 s by default): 8.00 USD/min. Replicate (3.00) fits, but its default model
  renders 6 s only, so Runway (7.20) must fit too, or the preset's own default duration could not be
  served; Veo is left out: quick clips do not need it.
- brand_campaign (floor 0.8; Replicate's 0.75 is under it): 12.00 USD/min, so that Runway (7.20) and
  silent Veo (12.00) both fit, and a campaign has a second backend to fall back to.
- premium_spot (floor 0.9): 24.00 USD/min, so that Veo with audio (24.00) fits as well as Runway.

Operators override the limits with AIPROD_GATEWAY_PRESET_PRICES (JSON, USD per minute of video, such as
`{"quick_social": 5.0}`): provider prices move often.
"""

import json
import math
from dataclasses import dataclass, replace

from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.money import MICROS_PER_UNIT, usd_from_units
from aiprod_kit.settings import ConfigurationError

DEFAULT_PRESET = "quick_social"
PRICES_VARIABLE = "AIPROD_GATEWAY_PRESET_PRICES"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    pipeline: int  # gateway_pb2.Pipeline
    quality_floor: float
    max_duration_seconds: float
    default_duration_seconds: float
    # The most a minute of its video may cost, in USD: its jobs' default max_cost.
    max_price_per_minute_usd: float
    requires_approval: bool
    priority: int  # gateway_pb2.Priority

    def price_limit_micros(self, duration_seconds: float) -> int:
        """The most a video of this length may cost under the preset, in micro-USD."""
        return round(self.max_price_per_minute_usd * MICROS_PER_UNIT * duration_seconds / 60)

    def to_proto(self) -> gateway_pb2.Preset:
        return gateway_pb2.Preset(
            name=self.name,
            description=self.description,
            pipeline=self.pipeline,
            quality_floor=self.quality_floor,
            max_duration_seconds=self.max_duration_seconds,
            default_duration_seconds=self.default_duration_seconds,
            max_price_per_minute=usd_from_units(self.max_price_per_minute_usd),
            requires_approval=self.requires_approval,
            priority=self.priority,
        )


_FAST, _FULL = gateway_pb2.PIPELINE_FAST, gateway_pb2.PIPELINE_FULL
_LOW, _MEDIUM, _HIGH = gateway_pb2.PRIORITY_LOW, gateway_pb2.PRIORITY_MEDIUM, gateway_pb2.PRIORITY_HIGH

# The presets with their default price limits (derived above).
PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("quick_social", "Short social clips, fast and cheap.", _FAST, 0.6, 30, 5, 8.00, False, _LOW),
        Preset("brand_campaign", "Campaign videos with an approval step.", _FULL, 0.8, 120, 8, 12.00, True,
               _MEDIUM),
        Preset("premium_spot", "Premium spots: best quality, approval step.", _FULL, 0.9, 180, 8, 24.00, True,
               _HIGH),
    )
}  # fmt: skip


def priced_presets(overrides: str) -> dict[str, Preset]:
    """The presets with the price limits of AIPROD_GATEWAY_PRESET_PRICES (JSON: preset name to USD per
    minute) applied over the defaults; ConfigurationError names the variable and what is wrong."""
    if not overrides.strip():
        return dict(PRESETS)
    try:
        prices = json.loads(overrides)
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"{PRICES_VARIABLE} is not JSON: {error}") from error
    if not isinstance(prices, dict):
        raise ConfigurationError(f"{PRICES_VARIABLE} must be a JSON object of preset names to USD per minute")
    presets = dict(PRESETS)
    for name, price in prices.items():
        if name not in presets:
            raise ConfigurationError(
                f"{PRICES_VARIABLE}: unknown preset {name!r} (known: {', '.join(PRESETS)})"
            )
        if (
            isinstance(price, bool)
            or not isinstance(price, int | float)
            or not math.isfinite(price)
            or price <= 0
        ):
            raise ConfigurationError(f"{PRICES_VARIABLE}.{name}: must be a positive number of USD per minute")
        presets[name] = replace(presets[name], max_price_per_minute_usd=float(price))
    return presets
