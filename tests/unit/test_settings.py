"""Settings an operator gets wrong, refused at start naming the variable; defaults that follow the
container's CPU limit rather than the node's cores."""

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from aiprod_kit.settings import GatewaySettings, ReplicateSettings, RunwaySettings, usable_cpus

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
    with pytest.raises(ValidationError, match="AIPROD_GCS_BUCKET") as raised:
        settings()
    assert "not a Cloud Storage bucket name (no gs://, no path)" in str(raised.value)
    monkeypatch.setenv("AIPROD_GCS_BUCKET", "aiprod-videos")
    assert settings().gcs_bucket == "aiprod-videos"


def test_replicate_refuses_offers_it_would_ignore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPROD_REPLICATE_OFFERS", "minimax/video-02")
    with pytest.raises(ValidationError, match="renders one model"):
        ReplicateSettings()
    monkeypatch.setenv("AIPROD_RUNWAY_OFFERS", "gen4_turbo")
    assert ("gen4_turbo", "720p") in RunwaySettings().offered()
