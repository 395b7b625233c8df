"""Local videos deleted with the last kept job that names them, with the real job store."""

import os
import time
from pathlib import Path

import pytest

from aiprod.common.v1 import job_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_gateway.store import SqlJobStore
from aiprod_gateway.videos import VideoRetention
from aiprod_kit.rendering.storage import LocalVideoStore

pytestmark = pytest.mark.parametrize("open_database", ["sqlite"], indirect=True)


def stored(videos: LocalVideoStore, content: bytes, when: float) -> Path:
    video, _ = videos.store(lambda path: path.write_bytes(content))
    path = videos.path_of(video.uri)
    os.utime(path, (when, when))
    return path


async def job_naming(jobs: SqlJobStore, job_id: str, *uris: str, ended: bool = True) -> None:
    await jobs.create_job(gateway_pb2.RenderJob(job_id=job_id, request_id=job_id, tenant_id="acme"), "f")

    def rendered(job: gateway_pb2.RenderJob) -> None:
        for index, uri in enumerate(uris):
            job.shots.add(index=index).output.video.uri = uri
        if ended:
            job.state = job_pb2.JOB_STATE_SUCCEEDED

    await jobs.append_event(job_id, "rendered", rendered)


async def test_a_purged_jobs_videos_go_unless_kept_jobs_name_them_or_they_were_stored_again(
    open_database, tmp_path
):
    jobs = await SqlJobStore.open(await open_database("jobs", private=True))
    videos = LocalVideoStore(tmp_path / "videos")
    cutoff = time.time() - 1000
    shared = stored(videos, b"the purged job's and a kept one's", cutoff - 10)
    own = [stored(videos, f"the purged job's own {n}".encode(), cutoff - 10) for n in range(3)]
    # Stored again since the cutoff, for a render whose job has not named it yet.
    again = stored(videos, b"stored again", cutoff + 10)
    elsewhere = "file:///not/in/this/store.mp4"
    await job_naming(jobs, "job_purged", *(p.as_uri() for p in (shared, *own, again)), elsewhere)
    await job_naming(jobs, "job_kept", shared.as_uri(), ended=False)
    assert await jobs.purge_ended(time.time() + 1, 100) == 1

    retention = VideoRetention(videos, jobs)
    assert [await retention.purge(cutoff, 2) for _ in range(3)] == [2, 2, 1]
    assert not any(path.exists() for path in own)
    assert shared.exists() and again.exists()
    assert await jobs.unnamed_videos(10) == []  # each looked at once

    # Once the last job naming it is purged, it goes.
    await jobs.append_event(
        "job_kept", "ended", lambda job: setattr(job, "state", job_pb2.JOB_STATE_SUCCEEDED)
    )
    await jobs.create_job(
        gateway_pb2.RenderJob(job_id="job_newest", request_id="newest", tenant_id="acme"), "f"
    )
    assert await jobs.purge_ended(time.time() + 1, 100) == 1
    assert await retention.purge(cutoff, 2) == 1
    assert not shared.exists() and again.exists()

    # What a crash left of a store goes once as old.
    partial = videos.directory / ".partial-crashed.mp4"
    partial.write_bytes(b"half a video")
    os.utime(partial, (cutoff - 10, cutoff - 10))
    assert await retention.purge(cutoff, 2) == 1
    assert not partial.exists() and again.exists()
