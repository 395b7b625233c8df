"""Settings an operator gets wrong, refused at start naming the variable; defaults that follow the
container's CPU limit rather than the node's cores."""

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from aiprod_kit.settings import (
    ConfigurationError,
    GatewaySettings,
    MetricsSettings,
    ReplicateSettings,
    RunwaySettings,
    load_settings,
    usable_cpus,
)

AFFINITY = len(os.sched_getaffinity(0))


def cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, AFFINITY),  # no cgroup files: the CPUs it may run on
        ({"cpu.max": "max 100000\n"}, AFFINITY),
        ({"cpu.max": "100000 100000\n"}, 1),  # a pod limited to one CPU
        ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU, rounded up
        ({"cpu.max": f"{(AFFINITY + 3) * 100000} 100000\n"}, AFFINITY),  # never more than it may run on
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, AFFINITY),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
        ({"cpu.max": "garbage\n"}, AFFINITY),
    ],
)
def test_usable_cpus_follow_the_containers_limit(
    tmp_path: Path, files: dict[str, str], expected: int
) -> None:
    assert usable_cpus(cgroup(tmp_path, files)) == expected


@pytest.mark.parametrize("settings", [GatewaySettings, RunwaySettings])
@pytest.mark.parametrize("bucket", ["gs://videos", "videos/outputs", "Videos"])
def test_a_bucket_given_as_a_url_or_a_path_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, settings: type, bucket: str
) -> None:
    monkeypatch.setenv("AIPROD_GCS_BUCKET", bucket)
    with pytest.raises(ConfigurationError) as raised:
        load_settings(settings)
    assert str(raised.value).startswith("AIPROD_GCS_BUCKET: ")
    assert "not a Cloud Storage bucket name (no gs://, no path)" in str(raised.value)
    monkeypatch.setenv("AIPROD_GCS_BUCKET", "aiprod-videos")
    assert load_settings(settings).gcs_bucket == "aiprod-videos"


def test_replicate_refuses_offers_it_would_ignore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPROD_REPLICATE_OFFERS", "minimax/video-02")
    with pytest.raises(ValidationError, match="renders one model"):
        ReplicateSettings()
    monkeypatch.setenv("AIPROD_RUNWAY_OFFERS", "gen4_turbo")
    assert ("gen4_turbo", "720p") in RunwaySettings().offered()


@pytest.mark.parametrize(
    ("settings", "variable", "value", "said"),
    [
        (GatewaySettings, "AIPROD_GATEWAY_JOB_LEASE_SECONDS", "0", "greater than 0"),
        (GatewaySettings, "AIPROD_GATEWAY_BUDGET_RETRY_SECONDS", "inf", "finite number"),
        (GatewaySettings, "AIPROD_GATEWAY_BUDGET_MAX_WAIT_SECONDS", "-1", "greater than or equal to 0"),
        (GatewaySettings, "AIPROD_GATEWAY_QUOTE_TTL_SECONDS", "0", "greater than 0"),
        (GatewaySettings, "AIPROD_GRPC_KEEPALIVE_SECONDS", "soon", "valid number"),
        (MetricsSettings, "AIPROD_METRICS_DAILY_CAP_USD", "-5", "greater than or equal to 0"),
        (MetricsSettings, "AIPROD_METRICS_TENANT_DAILY_CAP_USD", "1e13", "less than or equal to"),
        (MetricsSettings, "AIPROD_METRICS_NOTIFY_THRESHOLD", "1.5", "less than or equal to 1"),
        (MetricsSettings, "AIPROD_METRICS_RESERVATION_TTL_SECONDS", "0", "greater than 0"),
        (MetricsSettings, "AIPROD_METRICS_EXPIRY_SWEEP_SECONDS", "-1", "greater than 0"),
        (MetricsSettings, "AIPROD_METRICS_ALERT_INTERVAL_SECONDS", "nan", "finite number"),
        (MetricsSettings, "AIPROD_METRICS_SLO_WINDOW_DAYS", "0", "greater than or equal to 1"),
        (MetricsSettings, "AIPROD_METRICS_SLO_QUALITY_GOAL", "1", "less than 1"),
        (ReplicateSettings, "AIPROD_REPLICATE_PRICE_PER_SECOND_USD", "-0.01", "greater than or equal to 0"),
        (RunwaySettings, "AIPROD_RUNWAY_MAX_CONCURRENT_REQUESTS", "0", "greater than or equal to 1"),
    ],
)
def test_a_value_out_of_range_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, settings: type, variable: str, value: str, said: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as raised:
        load_settings(settings)
    assert str(raised.value).startswith(f"{variable}: ")
    assert said in str(raised.value)
    monkeypatch.delenv(variable)
    assert load_settings(settings)


def test_every_wrong_setting_is_named_at_once_and_a_value_that_is_not_read_is_not_repeated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIPROD_METRICS_NOTIFY_THRESHOLD", "0.8")
    monkeypatch.setenv("AIPROD_METRICS_ECONOMY_THRESHOLD", "0.75")
    with pytest.raises(ConfigurationError) as raised:
        load_settings(MetricsSettings)
    assert str(raised.value) == (
        "AIPROD_METRICS_ECONOMY_THRESHOLD (0.75) must not be under AIPROD_METRICS_NOTIFY_THRESHOLD (0.8)"
    )
    secret = "sk-not-a-number-7f3a"
    monkeypatch.setenv("AIPROD_GATEWAY_JOB_LEASE_SECONDS", secret)
    monkeypatch.setenv("AIPROD_GATEWAY_QUOTE_TTL_SECONDS", "-1")
    with pytest.raises(ConfigurationError) as raised:
        load_settings(GatewaySettings)
    said = str(raised.value)
    assert "AIPROD_GATEWAY_JOB_LEASE_SECONDS: " in said and "AIPROD_GATEWAY_QUOTE_TTL_SECONDS: " in said
    assert secret not in said
    assert raised.value.__cause__ is None  # nor in a chained pydantic error
