"""Long videos end to end against the provider sandbox: a job longer than any backend's longest clip
is planned as shots, each rendered as its own chain of attempts, and the shots are stitched into one
H.264 MP4 of one size and frame rate; a shot that fails falls back alone; a gateway and a renderer
killed in the middle of a job of several shots end with every shot paid once and the ledger equal to
the sandbox's bill.

Each sandbox render takes a second: a test waits on events and terminal states, never on time.
"""

import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import av
import pytest
from helpers.cli import aiprod
from helpers.mesh import budget, eventually, gateway, wait_terminal, watch_until
from helpers.sandbox import Sandbox, sandbox_mesh, settled_sandbox
from PIL import Image

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.mesh import Mesh

SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
RUNWAY, VEO = backend_pb2.BACKEND_RUNWAY, backend_pb2.BACKEND_VEO
FRAME_RATE = 24
# A provider request is tried this many times by a renderer before it gives up.
CREATE_TRIES = 4
# How many shots of one job render at once (AIPROD_GATEWAY_SHOT_CONCURRENCY's default).
SHOTS_AT_ONCE = 4
# Long enough for the money of a settlement retried with backoff (up to 10 s apart) to land.
SETTLE_SECONDS = 60


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    environment = {
        "AIPROD_METRICS_DAILY_CAP_USD": "0",
        # Veo 3.1: it takes reference images.
        "AIPROD_VEO_MODEL": "veo-3.1-generate-preview",
        # The providers' videos at 360p rather than 720p: five minutes of video in a few tests on two
        # cores, where the encoder's and decoder's work is not what is tested.
        "AIPROD_SANDBOX_VIDEO_SHORT_SIDE": "360",
        # Shots polled side by side: the providers' request rates (a request a second by default) are
        # not what is tested.
        **{f"AIPROD_{provider}_REQUESTS_PER_MINUTE": "6000" for provider in ("RUNWAY", "VEO", "REPLICATE")},
    }
    with sandbox_mesh(tmp_path_factory.mktemp("long-videos"), environment) as running:
        yield running


@pytest.fixture
def sandbox(mesh: Mesh) -> Sandbox:
    """The sandbox, reset once the ledger holds nothing in flight from earlier tests."""
    return settled_sandbox(mesh, SETTLE_SECONDS)


def create(mesh: Mesh, preset: str, seconds: float, **spec: object) -> gateway_pb2.RenderJob:
    request = gateway_pb2.CreateRenderJobRequest(
        spec=render_pb2.RenderSpec(
            prompt=f"A {preset} film: a lighthouse keeper's day",
            preset=preset,
            duration_seconds=seconds,
            **spec,
        )
    )
    return gateway(mesh).CreateRenderJob(request, timeout=30).job


def get(mesh: Mesh, job_id: str) -> gateway_pb2.RenderJob:
    return gateway(mesh).GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job_id), timeout=10).job


def approve(mesh: Mesh, job: gateway_pb2.RenderJob) -> None:
    gateway(mesh).ApproveRenderJob(
        gateway_pb2.ApproveRenderJobRequest(job_id=job.job_id, plan_version=job.plan_version), timeout=30
    )


def render_events(mesh: Mesh, job_id: str) -> list[gateway_pb2.JobEvent]:
    return watch_until(
        gateway(mesh), job_id, lambda event: event.state in (SUCCEEDED, job_pb2.JOB_STATE_FAILED)
    )


def png(colour: str) -> bytes:
    image = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(image, format="PNG")
    return image.getvalue()


def operation_created(mesh: Mesh, task_id: str) -> dict:
    """What the sandbox logged of the create of a Vertex operation (its log is copied to its file by
    the supervisor: looked at until it is there)."""
    task = task_id.rpartition("/")[2]
    found: list[dict] = []

    def logged() -> bool:
        lines = (mesh.data_dir / "logs" / "sandbox.log").read_text().splitlines()
        entries = (json.loads(line) for line in lines if line.startswith("{"))
        found[:] = [e for e in entries if e.get("event") == "operation_created" and e.get("task_id") == task]
        return bool(found)

    assert eventually(logged, timeout=10), task_id
    return found[0]


def decoded(uri: str) -> tuple[Counter[tuple[int, int]], int, float]:
    """The stored video's frame sizes (counted), frame count and frame rate, decoding every frame."""
    path = Path(url2pathname(urlsplit(uri).path))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        sizes = Counter((frame.width, frame.height) for frame in container.decode(stream))
        return sizes, sum(sizes.values()), float(stream.average_rate)


def assert_one_film(job: gateway_pb2.RenderJob, seconds: float) -> None:
    """Every shot rendered and stored; the result decodes to the plan's duration, within one frame per
    shot, at one size and frame rate throughout."""
    assert job.state == SUCCEEDED, job.error
    planned = sum(shot.duration_seconds for shot in job.plan.shots)
    assert len(job.plan.shots) > 1 and abs(planned - seconds) <= 1.0
    assert [shot.index for shot in job.shots] == list(range(len(job.plan.shots)))
    assert all(shot.state == SUCCEEDED and shot.output.video.uri for shot in job.shots), job.shots
    sizes, frames, rate = decoded(job.result.video.uri)
    assert len(sizes) == 1, sizes
    assert rate == FRAME_RATE
    assert abs(frames - planned * FRAME_RATE) <= len(job.plan.shots), (frames, planned)
    assert job.result.video.frame_count == frames
    assert job.result.qc.score > 0.8, job.result.qc
    # What the job cost is what its shots cost.
    assert job.cost.amount_micros == sum(shot.cost.amount_micros for shot in job.shots) > 0


def test_a_30_second_quick_social_job_is_shot_rendered_and_stitched(mesh, sandbox):
    job = create(mesh, "quick_social", 30)
    # Planned at once: no backend renders 30 s in one call at this preset's floor.
    assert len(job.plan.shots) > 1
    assert job.quote.price.amount_micros > 0
    done = wait_terminal(gateway(mesh), job.job_id)
    assert_one_film(done, 30)
    # The job prefers one backend for every shot, for a consistent look.
    assert {shot.backend for shot in done.shots} == {done.quote.backend}


def test_a_120_second_brand_campaign_is_reviewed_shot_by_shot_then_rendered(mesh, sandbox):
    job = create(mesh, "brand_campaign", 120)
    assert job.state == job_pb2.JOB_STATE_AWAITING_APPROVAL
    shots = len(job.plan.shots)
    assert shots > 1
    # The reviewer rewrites the second shot and moves the last one first; the plan is re-quoted.
    plan = render_pb2.RenderPlan()
    plan.CopyFrom(job.plan)
    plan.shots[1].prompt = "The lamp is lit at dusk"
    last = render_pb2.Shot()
    last.CopyFrom(plan.shots[-1])
    del plan.shots[-1]
    plan.shots.insert(0, last)
    edited = (
        gateway(mesh)
        .UpdateRenderManifest(
            gateway_pb2.UpdateRenderManifestRequest(
                job_id=job.job_id, plan=plan, plan_version=job.plan_version, update_mask={"paths": ["shots"]}
            ),
            timeout=30,
        )
        .job
    )
    assert edited.plan_version == 2 and edited.plan.shots[2].prompt == "The lamp is lit at dusk"
    assert edited.quote.quote_id != job.quote.quote_id
    approve(mesh, edited)
    done = wait_terminal(gateway(mesh), job.job_id)
    assert_one_film(done, 120)
    assert len(done.shots) == shots


def test_a_180_second_premium_spot_is_rendered_and_stitched(mesh, sandbox):
    job = create(mesh, "premium_spot", 180)
    approve(mesh, job)
    done = wait_terminal(gateway(mesh), job.job_id)
    assert_one_film(done, 180)


def test_a_shot_whose_backend_fails_falls_back_alone(mesh, sandbox):
    # Three continuous shots render one after the other; the first one's create at Runway fails on
    # every try (503): that shot goes elsewhere, the others stay on Runway.
    sandbox.fault("runway", "create", "5xx", times=CREATE_TRIES)
    shots = [
        render_pb2.Shot(prompt="The keeper wakes", duration_seconds=4),
        render_pb2.Shot(prompt="He climbs the stairs", duration_seconds=4, continuous=True),
        render_pb2.Shot(prompt="He lights the lamp", duration_seconds=4, continuous=True),
    ]
    job = create(
        mesh,
        "quick_social",
        0,
        shots=shots,
        constraints=render_pb2.RenderConstraints(preferred_backend=RUNWAY),
    )
    done = wait_terminal(gateway(mesh), job.job_id)
    assert_one_film(done, 12)
    assert [shot.backend for shot in done.shots][1:] == [RUNWAY, RUNWAY]
    assert done.shots[0].backend != RUNWAY
    events = render_events(mesh, job.job_id)
    fallbacks = [event for event in events if event.render.HasField("fallback")]
    assert [event.render.shot for event in fallbacks] == [0]
    assert any(
        event.render.shot == 0 and "not runway" in event.message
        for event in events
        if event.render.HasField("routed")
    ), [event.message for event in events]


def test_a_shot_that_fails_for_good_fails_the_job_naming_it_and_the_other_shots_stay_listed(mesh, sandbox):
    shots = [
        render_pb2.Shot(prompt="The keeper wakes", duration_seconds=4),
        render_pb2.Shot(prompt="A storm no provider can draw [sandbox:fail]", duration_seconds=4),
        render_pb2.Shot(prompt="He lights the lamp", duration_seconds=4),
    ]
    job = create(mesh, "quick_social", 0, shots=shots)
    done = wait_terminal(gateway(mesh), job.job_id)
    assert done.state == job_pb2.JOB_STATE_FAILED
    assert done.error.message.startswith("shot 2 of 3 failed: "), done.error
    assert done.shots[1].state == job_pb2.JOB_STATE_FAILED
    # The other shots were rendered, paid and kept: their videos are listed on the job.
    for index in (0, 2):
        assert done.shots[index].state == SUCCEEDED and done.shots[index].output.video.uri, done.shots[index]
    assert not done.HasField("result")


def test_a_continuous_shot_starts_from_the_last_frame_of_the_shot_before(mesh, sandbox):
    shots = [
        render_pb2.Shot(prompt="The keeper climbs the stairs", duration_seconds=4),
        render_pb2.Shot(prompt="He opens the lantern room", duration_seconds=4, continuous=True),
    ]
    job = create(mesh, "quick_social", 0, shots=shots)
    assert [shot.prompt for shot in job.plan.shots] == [shot.prompt for shot in shots]
    done = wait_terminal(gateway(mesh), job.job_id)
    assert_one_film(done, 8)
    events = [event.render for event in render_events(mesh, job.job_id) if event.HasField("render")]
    first_done = next(i for i, event in enumerate(events) if event.shot == 0 and event.HasField("succeeded"))
    second_routed = next(i for i, event in enumerate(events) if event.shot == 1 and event.HasField("routed"))
    assert first_done < second_routed


def test_the_jobs_reference_images_go_to_every_shot_its_backend_renders(mesh, sandbox):
    references = [render_pb2.Image(data=png(colour), mime_type="image/png") for colour in ("red", "blue")]
    shots = [
        render_pb2.Shot(prompt="The keeper's face", duration_seconds=8),
        render_pb2.Shot(prompt="The keeper's lamp", duration_seconds=8),
    ]
    job = create(
        mesh, "quick_social", 0, shots=shots, reference_images=references,
        constraints=render_pb2.RenderConstraints(preferred_backend=VEO),
    )  # fmt: skip
    # Kept once, on the spec: not copied into every shot of the stored plan.
    assert not any(shot.reference_images for shot in job.plan.shots)
    done = wait_terminal(gateway(mesh), job.job_id)
    assert_one_film(done, 16)
    assert {shot.backend for shot in done.shots} == {VEO}
    seen = [operation_created(mesh, shot.handle.task_id)["reference_images"] for shot in done.shots]
    assert seen == [2, 2]


def test_a_gateway_and_a_renderer_killed_mid_job_pay_every_shot_once(mesh, sandbox):
    sandbox.reset(render_seconds=3)
    before = budget(mesh).spent.amount_micros
    job = create(mesh, "quick_social", 30, constraints=render_pb2.RenderConstraints(preferred_backend=RUNWAY))
    shots = len(job.plan.shots)
    # Killed once as many shots as render at once were submitted (none in the middle of its create),
    # before they finish; the others start after the restarts.
    submitted = set()

    def all_at_once_submitted(event: gateway_pb2.JobEvent) -> bool:
        if event.render.HasField("submitted"):
            submitted.add(event.render.shot)
        return len(submitted) == SHOTS_AT_ONCE

    assert shots > SHOTS_AT_ONCE
    watch_until(gateway(mesh), job.job_id, all_at_once_submitted)
    mesh.kill("gateway")
    mesh.kill("renderer-runway")
    mesh.start_service("renderer-runway")
    mesh.start_service("gateway")
    done = wait_terminal(gateway(mesh), job.job_id)
    assert_one_film(done, 30)
    assert len(done.shots) == shots
    # Every shot's attempt created once at its provider, whatever the restarts.
    creates = Counter()
    for provider in ("runway", "veo", "replicate"):
        creates.update(sandbox.creates(provider))
    assert all(count == 1 for count in creates.values()), creates
    assert set(creates) == {
        attempt.reservation_key for attempt in done.attempts if attempt.HasField("handle")
    }
    # Once settled, the ledger holds exactly what the sandbox billed.
    assert eventually(
        lambda: all(attempt.settled for attempt in get(mesh, job.job_id).attempts), timeout=SETTLE_SECONDS
    )
    assert eventually(lambda: len(sandbox.bills().tasks) >= len(creates), timeout=SETTLE_SECONDS)
    bills = sandbox.bills()
    done = get(mesh, job.job_id)
    assert bills.total_micros == done.cost.amount_micros
    assert budget(mesh).spent.amount_micros - before == bills.total_micros
    assert done.attempts and all(
        attempt.charge.outcome == event_pb2.CHARGE_OUTCOME_COMMIT for attempt in done.attempts
    )


def test_the_cli_follows_a_long_video_shot_by_shot_and_lists_its_shots(mesh, sandbox, tmp_path):
    out = tmp_path / "film.mp4"
    rendered = aiprod(
        "render", "A harbour at dawn", "--preset", "quick_social", "--duration", "16", "--out", str(out),
        "--gateway", mesh.address("gateway"), api_key=mesh.api_key,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    shown = rendered.stdout + rendered.stderr
    assert "shot 1/2: routed to" in shown and "shot 2/2: rendered by" in shown, shown
    job_id = re.search(r"job_[0-9a-f]{32}", shown).group(0)
    job = get(mesh, job_id)
    assert out.read_bytes() and decoded(job.result.video.uri)[1] == job.result.video.frame_count
    listed = aiprod("jobs", "get", job_id, "--gateway", mesh.address("gateway"), api_key=mesh.api_key)
    assert listed.returncode == 0, listed.stderr
    assert "Shots" in listed.stdout and "2, 2 rendered" in listed.stdout, listed.stdout
    rows = [line.split() for line in listed.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    # Each shot's row: its number, length, state and stored video.
    assert [(row[:4], row[-1]) for row in rows] == [
        ([str(shot.index), "8", "s", "SUCCEEDED"], shot.output.video.uri) for shot in job.shots
    ], listed.stdout
