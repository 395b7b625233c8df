"""How `aiprod render --out` and `aiprod jobs watch --out` hand a finished video over: copied from the local
disk, or downloaded from Google Cloud Storage (a real local emulator here), never left half written."""

from pathlib import Path

import pytest
from google.cloud import storage

from aiprod.gateway.v1 import gateway_pb2
from aiprod_cli.render import RenderError, deliver_video

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64


def finished(uri: str) -> gateway_pb2.RenderJob:
    job = gateway_pb2.RenderJob(job_id="job_" + "0" * 32)
    job.result.video.uri = uri
    return job


def test_a_local_video_is_its_path_or_copied_to_out(tmp_path: Path) -> None:
    stored = tmp_path / "store" / "ab" / "abc.mp4"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(VIDEO)
    job = finished(stored.as_uri())

    assert deliver_video(job, None) == str(stored)
    out = tmp_path / "films" / "fox.mp4"
    assert deliver_video(job, out) == str(out)
    assert out.read_bytes() == VIDEO
    assert sorted(path.name for path in out.parent.iterdir()) == ["fox.mp4"]


def test_a_video_in_cloud_storage_is_its_uri_or_downloaded_to_out(
    gcs_bucket: storage.Bucket, tmp_path: Path
) -> None:
    gcs_bucket.blob("videos/ab/abc.mp4").upload_from_string(VIDEO)
    job = finished(f"gs://{gcs_bucket.name}/videos/ab/abc.mp4")

    assert deliver_video(job, None) == job.result.video.uri
    out = tmp_path / "fox.mp4"
    assert deliver_video(job, out) == str(out)
    assert out.read_bytes() == VIDEO


def test_a_video_that_cannot_be_downloaded_leaves_nothing_at_out(
    gcs_bucket: storage.Bucket, tmp_path: Path
) -> None:
    job = finished(f"gs://{gcs_bucket.name}/videos/ab/gone.mp4")
    out = tmp_path / "fox.mp4"

    with pytest.raises(
        RenderError, match=r"cannot copy gs://.*/gone\.mp4 to .*fox\.mp4: Cloud Storage answered 404"
    ):
        deliver_video(job, out)

    assert list(tmp_path.iterdir()) == []


def test_without_credentials_the_download_says_how_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud login either
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # and not on Google Cloud: no metadata server to ask

    with pytest.raises(RenderError, match=r"no Google Cloud credentials here .*application-default login"):
        deliver_video(finished("gs://videos/videos/ab/abc.mp4"), tmp_path / "fox.mp4")


def test_a_video_elsewhere_is_not_copied(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="only file:// and gs:// videos are copied"):
        deliver_video(finished("https://cdn.example.com/abc.mp4"), tmp_path / "fox.mp4")
