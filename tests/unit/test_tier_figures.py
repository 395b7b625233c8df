"""SLA tiers from configuration: the first version's figures by default, AIPROD_GATEWAY_TIERS overriding
any of them, and a wrong setting named."""

import pytest

from aiprod.gateway.v1 import admin_pb2
from aiprod_gateway.tiers import DEFAULT_TIERS, parse_tiers
from aiprod_kit.settings import ConfigurationError


def test_defaults_are_the_first_versions_figures():
    tiers = parse_tiers("")
    assert tiers == DEFAULT_TIERS
    bronze = tiers[admin_pb2.SLA_TIER_BRONZE]
    assert (bronze.latency_seconds, bronze.quality_minimum, bronze.max_duration_seconds) == (300, 0.6, 30)
    assert (bronze.concurrent_jobs, bronze.requests_per_minute) == (2, 10)
    gold = tiers[admin_pb2.SLA_TIER_GOLD]
    assert (gold.latency_seconds, gold.quality_minimum, gold.concurrent_jobs, gold.requests_per_minute) == (
        900,
        0.7,
        10,
        50,
    )
    platinum = tiers[admin_pb2.SLA_TIER_PLATINUM]
    assert (platinum.quality_minimum, platinum.max_duration_seconds, platinum.concurrent_jobs) == (
        0.9,
        180,
        50,
    )


def test_overrides_change_only_what_they_name():
    tiers = parse_tiers('{"gold": {"concurrent_jobs": 20}, "BRONZE": {"requests_per_minute": 3}}')
    assert tiers[admin_pb2.SLA_TIER_GOLD].concurrent_jobs == 20
    assert tiers[admin_pb2.SLA_TIER_GOLD].requests_per_minute == 50
    assert tiers[admin_pb2.SLA_TIER_BRONZE].requests_per_minute == 3
    assert tiers[admin_pb2.SLA_TIER_PLATINUM] == DEFAULT_TIERS[admin_pb2.SLA_TIER_PLATINUM]
    assert parse_tiers("") == DEFAULT_TIERS  # the defaults themselves untouched


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ("{", "not JSON"),
        ("[]", "JSON object"),
        ('{"SILVER": {}}', "unknown tier 'SILVER'"),
        ('{"UNSPECIFIED": {}}', "unknown tier"),
        ('{"GOLD": {"speed": 1}}', "AIPROD_GATEWAY_TIERS.GOLD"),
        ('{"GOLD": {"concurrent_jobs": -1}}', "AIPROD_GATEWAY_TIERS.GOLD.concurrent_jobs"),
        ('{"GOLD": {"concurrent_jobs": true}}', "AIPROD_GATEWAY_TIERS.GOLD.concurrent_jobs"),
    ],
)
def test_a_wrong_setting_is_named(raw, named):
    with pytest.raises(ConfigurationError, match="AIPROD_GATEWAY_TIERS") as raised:
        parse_tiers(raw)
    assert named in str(raised.value)
