"""Every backend end to end, as users run it: `aiprod up --sandbox`, then `aiprod render --backend`."""

import json
from collections.abc import Iterator

import av
import pytest
from helpers.cli import aiprod, aiprod_up, gateway_address

FAST = {
    "AIPROD_SANDBOX_RENDER_SECONDS": "1",
    "AIPROD_RUNWAY_POLL_SECONDS": "0.2",
    "AIPROD_VEO_POLL_SECONDS": "0.2",
    "AIPROD_REPLICATE_POLL_SECONDS": "0.2",
}


@pytest.fixture(scope="module")
def sandbox_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The gateway's address and the development tenant's key `aiprod up` printed."""
    with aiprod_up(tmp_path_factory.mktemp("sandbox-mesh"), "--sandbox", environment=FAST) as (_, info):
        names = {service["name"] for service in info["services"]}
        assert {"sandbox", "renderer-runway", "renderer-veo", "renderer-replicate", "renderer-local"} <= names
        yield gateway_address(info), info["api_key"]


# Durations each backend's default model renders: Runway gen4.5 2-10 s, Veo 4/6/8 s, Replicate video-01 6 s.
@pytest.mark.parametrize(("backend", "seconds"), [("runway", 4), ("veo", 4), ("replicate", 6), ("local", 2)])
def test_each_backend_renders_a_checked_video(sandbox_gateway, tmp_path, backend, seconds):
    out = tmp_path / f"{backend}.mp4"
    address, api_key = sandbox_gateway
    rendered = aiprod(
        "render", f"A {backend} test: a heron in the reeds", "--backend", backend, "--duration", str(seconds),
        "--json", "--gateway", address, "--out", str(out), api_key=api_key,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    job = json.loads(rendered.stdout)
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert job["backend"] == f"BACKEND_{backend.upper()}"
    assert job["result"]["qc"]["score"] > 0.8
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert frames == round(seconds * float(stream.average_rate))
