"""A mesh that keeps its videos in Google Cloud Storage (`AIPROD_GCS_BUCKET`), as on GKE, against
gcp-storage-emulator: the local renderer's outputs land in the bucket as the providers' do, the gateway
stitches a film from them there, and `aiprod render --out` downloads it."""

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import av
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from helpers.cli import aiprod

from aiprod_kit.mesh import Mesh

EMULATOR = "STORAGE_EMULATOR_HOST"


@pytest.fixture(scope="module")
def bucket(storage_emulator_host: str) -> Iterator[storage.Bucket]:
    """A bucket of the emulator, which every Cloud Storage client of this module finds, the CLI's too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(EMULATOR, storage_emulator_host)
        client = storage.Client(project="test", credentials=AnonymousCredentials())
        yield client.create_bucket(f"aiprod-videos-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def mesh(bucket: storage.Bucket, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(
        tmp_path_factory.mktemp("gcs-mesh"),
        free_ports=True,
        environment={"AIPROD_GCS_BUCKET": bucket.name, EMULATOR: os.environ[EMULATOR]},
    )
    running.start()
    yield running
    running.stop()


def render(mesh: Mesh, out: Path, *args: str) -> dict:
    result = aiprod(
        "render",
        *args,
        "--out",
        str(out),
        "--json",
        "--gateway",
        mesh.address("gateway"),
        api_key=mesh.api_key,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def stored(bucket: storage.Bucket, uri: str) -> bytes:
    prefix = f"gs://{bucket.name}/"
    assert uri.startswith(prefix), uri
    return bucket.blob(uri.removeprefix(prefix)).download_as_bytes()


def test_a_local_render_is_kept_in_the_bucket_and_downloaded_by_the_cli(
    mesh: Mesh, bucket: storage.Bucket, tmp_path: Path
) -> None:
    out = tmp_path / "fox.mp4"

    job = render(mesh, out, "A fox in the snow", "--duration", "2", "--backend", "local")

    assert job["state"] == "JOB_STATE_SUCCEEDED"
    video = job["result"]["video"]
    assert video["uri"].startswith(f"gs://{bucket.name}/videos/")
    assert stored(bucket, video["uri"]) == out.read_bytes()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == video["sha256"]
    # Nothing left on the renderer's disk: not in the videos, not in its scratch space.
    assert not list((mesh.data_dir / "videos").rglob("*.mp4"))
    assert not list((mesh.data_dir / "tmp").rglob("*.mp4"))


def test_a_film_is_stitched_from_shots_in_the_bucket(
    mesh: Mesh, bucket: storage.Bucket, tmp_path: Path
) -> None:
    out = tmp_path / "beach.mp4"

    job = render(
        mesh,
        out,
        "A day at the beach",
        "--shot",
        "2:Waves at dawn",
        "--shot",
        "2:Gulls at noon",
        "--backend",
        "local",
    )

    assert job["state"] == "JOB_STATE_SUCCEEDED"
    shots = [shot["output"]["video"]["uri"] for shot in job["shots"]]
    assert len(shots) == 2 and all(uri.startswith(f"gs://{bucket.name}/") for uri in shots), shots
    assert stored(bucket, job["result"]["video"]["uri"]) == out.read_bytes()
    with av.open(str(out)) as container:
        assert container.streams.video[0].frames == 96
