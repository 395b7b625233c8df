"""The presets a job can use (carried over from the product's first version)."""

from dataclasses import dataclass

from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.money import usd_from_units

DEFAULT_PRESET = "quick_social"

# What a minute of video cost on Runway alone in the product's first version: the baseline of a quote's
# and a job's savings.
RUNWAY_ONLY_USD_MICROS_PER_MINUTE = 2_500_000


def runway_only_micros(duration_seconds: float) -> int:
    return round(RUNWAY_ONLY_USD_MICROS_PER_MINUTE * duration_seconds / 60)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    pipeline: str
    quality_floor: float
    max_duration_seconds: float
    default_duration_seconds: float
    max_price_per_minute_usd: float
    requires_approval: bool
    priority: str

    def to_proto(self) -> gateway_pb2.Preset:
        return gateway_pb2.Preset(
            name=self.name,
            description=self.description,
            pipeline=gateway_pb2.Pipeline.Value(f"PIPELINE_{self.pipeline.upper()}"),
            quality_floor=self.quality_floor,
            max_duration_seconds=self.max_duration_seconds,
            default_duration_seconds=self.default_duration_seconds,
            max_price_per_minute=usd_from_units(self.max_price_per_minute_usd),
            requires_approval=self.requires_approval,
            priority=gateway_pb2.Priority.Value(f"PRIORITY_{self.priority.upper()}"),
        )


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("quick_social", "Short social clips, fast and cheap.", "fast", 0.6, 30, 5, 0.50, False, "low"),
        Preset("brand_campaign", "Campaign videos with an approval step.", "full", 0.8, 120, 8, 0.95, True,
               "medium"),
        Preset("premium_spot", "Premium spots: best quality, approval step.", "full", 0.9, 180, 8, 1.50, True,
               "high"),
    )
}  # fmt: skip
