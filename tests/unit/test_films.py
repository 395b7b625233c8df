"""The gateway's films: a long video's shots fetched from the video store, stitched, stored and scored;
a shot's video the store cannot read fails the film naming the shot."""

from pathlib import Path

import pytest

from aiprod.common.v1 import render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_gateway.films import Films
from aiprod_kit.money import usd
from aiprod_kit.rendering.stitching import StitchError
from aiprod_kit.rendering.storage import LocalVideoStore
from aiprod_renderers.local import synth

WIDTH, HEIGHT = 160, 90


async def stored_shot(
    store: LocalVideoStore, tmp_path: Path, name: str, seconds: float
) -> render_pb2.RenderOutput:
    path = tmp_path / f"{name}.mp4"
    synth.encode_video(path, name, 7, seconds, WIDTH, HEIGHT)
    stored = await store.put(path)
    video = render_pb2.VideoArtifact(
        uri=stored.uri, duration_seconds=seconds, width=WIDTH, height=HEIGHT, frame_rate=synth.FRAME_RATE
    )
    return render_pb2.RenderOutput(video=video)


def job_of(*outputs: render_pb2.RenderOutput) -> gateway_pb2.RenderJob:
    job = gateway_pb2.RenderJob(job_id="job_a", cost=usd(1_500_000))
    for index, output in enumerate(outputs):
        job.plan.shots.add(prompt=f"shot {index}", duration_seconds=output.video.duration_seconds)
        job.shots.add(index=index, output=output)
    return job


async def test_a_film_is_its_shots_stitched_stored_and_scored(tmp_path):
    store = LocalVideoStore(tmp_path / "videos")
    films = Films(store, tmp_path / "work")
    job = job_of(
        await stored_shot(store, tmp_path, "dawn", 1.0), await stored_shot(store, tmp_path, "dusk", 0.5)
    )
    film = await films.stitch(job)
    video = film.video
    assert (video.width, video.height, video.frame_rate, video.frame_count) == (WIDTH, HEIGHT, 24, 36)
    assert store.path_of(video.uri).stat().st_size == video.size_bytes > 0
    assert film.qc.score > 0.9 and film.cost == job.cost
    # Stitched again (a restart before the job recorded it): the same video.
    assert (await films.stitch(job)).video.uri == video.uri
    assert not any((tmp_path / "work").iterdir())  # no scratch left behind


async def test_a_shot_the_store_cannot_read_fails_the_film_naming_it(tmp_path):
    store = LocalVideoStore(tmp_path / "videos")
    films = Films(store, tmp_path / "work")
    elsewhere = await stored_shot(LocalVideoStore(tmp_path / "another-pod"), tmp_path, "dusk", 0.5)
    job = job_of(await stored_shot(store, tmp_path, "dawn", 0.5), elsewhere)
    with pytest.raises(StitchError) as failed:
        await films.stitch(job)
    assert failed.value.shot == 1 and "shot 1" in str(failed.value)
    with pytest.raises(StitchError):
        await films.last_frame(elsewhere, 1)
    frame = await films.last_frame(job.shots[0].output, 0)
    assert frame.mime_type == "image/png" and frame.data.startswith(b"\x89PNG")
