"""The presets: the first version's names and limits, price limits that today's providers can meet, and
their configuration."""

import pytest

from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.presets import PRESETS, priced_presets
from aiprod_kit.settings import ConfigurationError

# Today's list prices of the renderers' default models, USD per minute, with their nominal quality and
# the durations they render (services/renderers/*/provider.py).
REPLICATE = (3.00, 0.75, {6})
RUNWAY = (7.20, 0.95, set(range(2, 11)))
VEO_SILENT = (12.00, 0.92, {4, 6, 8})
VEO_AUDIO = (24.00, 0.92, {4, 6, 8})


def test_the_first_versions_presets_keep_their_names_floors_durations_approval_and_priority():
    assert {
        name: (
            preset.quality_floor,
            preset.max_duration_seconds,
            preset.requires_approval,
            preset.priority,
            preset.pipeline,
        )
        for name, preset in PRESETS.items()
    } == {
        "quick_social": (0.6, 30, False, gateway_pb2.PRIORITY_LOW, gateway_pb2.PIPELINE_FAST),
        "brand_campaign": (0.8, 120, True, gateway_pb2.PRIORITY_MEDIUM, gateway_pb2.PIPELINE_FULL),
        "premium_spot": (0.9, 180, True, gateway_pb2.PRIORITY_HIGH, gateway_pb2.PIPELINE_FULL),
    }


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_is_served_at_its_floor_and_default_duration_by_a_backend_within_its_limit(name):
    preset = PRESETS[name]
    fits = [
        per_minute
        for per_minute, quality, durations in (REPLICATE, RUNWAY, VEO_SILENT, VEO_AUDIO)
        if quality >= preset.quality_floor
        and preset.default_duration_seconds in durations
        and per_minute <= preset.max_price_per_minute_usd
    ]
    assert fits, f"no backend serves {name} within {preset.max_price_per_minute_usd} USD a minute"


def test_dearer_presets_allow_more():
    limits = [
        PRESETS[name].max_price_per_minute_usd for name in ("quick_social", "brand_campaign", "premium_spot")
    ]
    assert limits == sorted(limits)
    # Runway meets the campaign's floor, and silent Veo too: a campaign has a backend to fall back to.
    assert PRESETS["brand_campaign"].max_price_per_minute_usd >= VEO_SILENT[0]
    assert PRESETS["premium_spot"].max_price_per_minute_usd >= VEO_AUDIO[0]


def test_the_price_limit_of_a_video_is_its_minutes_at_the_presets_price():
    preset = PRESETS["quick_social"]  # 8.00 USD a minute
    assert preset.price_limit_micros(6) == 800_000
    assert preset.price_limit_micros(30) == 4_000_000


def test_the_proto_carries_the_price_and_the_enums():
    proto = PRESETS["premium_spot"].to_proto()
    assert proto.max_price_per_minute.amount_micros == 24_000_000
    assert proto.max_price_per_minute.currency_code == "USD"
    assert proto.priority == gateway_pb2.PRIORITY_HIGH
    assert proto.pipeline == gateway_pb2.PIPELINE_FULL


def test_configured_prices_override_the_defaults_of_the_presets_they_name():
    presets = priced_presets('{"quick_social": 5, "premium_spot": 30.5}')
    assert presets["quick_social"].max_price_per_minute_usd == 5.0
    assert presets["premium_spot"].max_price_per_minute_usd == 30.5
    assert presets["brand_campaign"] == PRESETS["brand_campaign"]
    # Everything but the price stays.
    assert presets["quick_social"].quality_floor == PRESETS["quick_social"].quality_floor
    assert priced_presets("") == PRESETS
    assert priced_presets("  ") == PRESETS


@pytest.mark.parametrize(
    "raw, names",
    [
        ("{", "is not JSON"),
        ("[5]", "JSON object"),
        ('{"cheap_and_cheerful": 5}', "unknown preset 'cheap_and_cheerful'"),
        ('{"quick_social": 0}', "quick_social: must be a positive number"),
        ('{"quick_social": -1}', "quick_social: must be a positive number"),
        ('{"quick_social": "5"}', "quick_social: must be a positive number"),
        ('{"quick_social": true}', "quick_social: must be a positive number"),
        ('{"quick_social": NaN}', "quick_social: must be a positive number"),
    ],
)
def test_a_wrong_price_configuration_names_the_variable(raw, names):
    with pytest.raises(ConfigurationError) as raised:
        priced_presets(raw)
    assert str(raised.value).startswith("AIPROD_GATEWAY_PRESET_PRICES")
    assert names in str(raised.value)
