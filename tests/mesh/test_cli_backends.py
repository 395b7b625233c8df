"""`aiprod backends`, `aiprod render --explain` and renders from images, run as users do against a mesh
with the provider sandbox."""

import base64
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import av
import pytest
from helpers.cli import AIPROD, cli_environment, usage_error
from PIL import Image

from aiprod_cli.explain import explain_route
from aiprod_cli.spec import build_spec
from aiprod_kit.mesh import Mesh

# The development tenant's tier (the test meshes', conftest.py) asks more quality than quick_social's
# floor (0.6): a plan must rank as the job is routed, with the tier's minimum.
TIER_QUALITY_MINIMUM = 0.7
TIERS = json.loads(os.environ["AIPROD_GATEWAY_TIERS"])
TIERS["GOLD"]["quality_minimum"] = TIER_QUALITY_MINIMUM
ENVIRONMENT = {
    "AIPROD_GATEWAY_TIERS": json.dumps(TIERS),
    "AIPROD_SANDBOX_RENDER_SECONDS": "1",
    "AIPROD_RUNWAY_POLL_SECONDS": "0.2",
    "AIPROD_VEO_POLL_SECONDS": "0.2",
    "AIPROD_REPLICATE_POLL_SECONDS": "0.2",
}
BACKENDS = {"BACKEND_LOCAL", "BACKEND_RUNWAY", "BACKEND_VEO", "BACKEND_REPLICATE"}
# Every backend's entry has these, zero values included.
STATUS_FIELDS = ("health", "breaker", "p95_latency", "qc_average", "price_per_second")
# A render takes a couple of seconds in the sandbox; this is only there to fail rather than hang.
TIMEOUT_SECONDS = 120


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(
        tmp_path_factory.mktemp("cli-backends"), free_ports=True, sandbox=True, environment=ENVIRONMENT
    )
    running.start()
    yield running
    running.stop()


def aiprod(*args: str, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
    # Wide enough that rich wraps no line of the progress notes or of the route plan.
    environment = cli_environment(api_key)
    return subprocess.run(
        [str(AIPROD), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
        env=environment,
    )


def json_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def backends_by_name(mesh: Mesh) -> dict[str, dict[str, Any]]:
    listed = json_of(aiprod("backends", "--json", "--router", mesh.address("router")))
    return {status["backend"]: status for status in listed["backends"]}


def closed_port() -> int:
    """A port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_backends_lists_every_backend_with_its_health_breaker_and_figures(mesh: Mesh) -> None:
    backends = backends_by_name(mesh)

    assert set(backends) == BACKENDS
    for name, status in backends.items():
        missing = [field for field in STATUS_FIELDS if field not in status]
        assert not missing, f"{name} lacks {missing}"
        assert status["health"] == "BACKEND_HEALTH_SERVING"
        assert status["breaker"] == "BREAKER_STATE_CLOSED"
        assert set(status["price_per_second"]) == {"currency_code", "amount_micros"}
    assert int(backends["BACKEND_RUNWAY"]["price_per_second"]["amount_micros"]) > 0

    table = aiprod("backends", "--router", mesh.address("router"))
    assert table.returncode == 0, table.stderr
    for heading in ("backend", "health", "breaker", "p95", "success", "QC avg", "price/s", "renders"):
        assert heading in table.stdout
    for name in ("local", "runway", "veo", "replicate"):
        assert re.search(rf"^\s*{name}\s+serving\s+closed\s", table.stdout, re.MULTILINE), table.stdout


def test_backends_without_a_router_exits_2_and_says_where_it_looked() -> None:
    address = f"127.0.0.1:{closed_port()}"

    result = aiprod("backends", "--json", "--router", address)

    assert result.returncode == 2
    assert result.stdout == ""
    assert "UNAVAILABLE" in result.stderr
    assert f"is the router running at {address}?" in result.stderr


def test_a_render_shows_in_the_backends_figures(mesh: Mesh) -> None:
    job = json_of(
        aiprod(
            "render",
            "A paper boat sailing across a sunlit pond",
            "--backend",
            "runway",
            "--duration",
            "4",
            "--json",
            "--gateway",
            mesh.address("gateway"),
            api_key=mesh.api_key,
        )
    )
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert job["backend"] == "BACKEND_RUNWAY"
    assert "explain" not in job  # only with --explain

    runway = backends_by_name(mesh)["BACKEND_RUNWAY"]
    assert int(runway["renders"]) >= 1
    assert runway["qc_average"] > 0
    assert runway["success_rate"] > 0
    assert runway["p95_latency"] != "0s"


def test_render_explain_json_has_every_backends_estimate_ranked_as_the_job_is_routed(mesh: Mesh) -> None:
    result = aiprod(
        "render",
        "A lighthouse in a storm",
        "--duration",
        "4",
        "--explain",
        "--json",
        "--gateway",
        mesh.address("gateway"),
        api_key=mesh.api_key,
    )
    job = json_of(result)  # one JSON object on stdout, the plan included
    assert job["state"] == "JOB_STATE_SUCCEEDED"

    explain = job["explain"]
    assert {estimate["backend"] for estimate in explain} == BACKENDS
    for estimate in explain:
        assert {"estimated_cost", "estimated_latency", "reasons", "model", "resolution"} <= set(estimate)
        assert estimate["reasons"], estimate
    qualifying = [estimate for estimate in explain if estimate["qualifies"]]
    # The route first, the qualifying ones ranked 1, 2...; the others after them, unranked.
    assert explain[: len(qualifying)] == qualifying
    assert [estimate["rank"] for estimate in qualifying] == list(range(1, len(qualifying) + 1))
    assert all(estimate["rank"] == 0 for estimate in explain[len(qualifying) :])

    by_name: dict[str, list[dict[str, Any]]] = {}
    for estimate in explain:
        by_name.setdefault(estimate["backend"], []).append(estimate)
    # The local renderer's quality (0.5) is under the floor: the tier's 0.70, not quick_social's 0.60,
    # as the job's own routing says.
    local_reasons = [reason for estimate in by_name["BACKEND_LOCAL"] for reason in estimate["reasons"]]
    assert not any(estimate["qualifies"] for estimate in by_name["BACKEND_LOCAL"])
    assert any(f"floor {TIER_QUALITY_MINIMUM:.2f}" in reason for reason in local_reasons), local_reasons
    # Replicate's model renders 6 s only.
    assert not any(estimate["qualifies"] for estimate in by_name["BACKEND_REPLICATE"])
    assert qualifying[0]["backend"] in {"BACKEND_RUNWAY", "BACKEND_VEO"}
    assert int(qualifying[0]["estimated_cost"]["amount_micros"]) > 0
    # The plan is the gateway's quote for the same render: the job went where it ranked first.
    assert job["backend"] == qualifying[0]["backend"]


def test_a_render_from_image_files_sends_them_inline_to_a_backend_that_takes_a_first_frame(
    mesh: Mesh, tmp_path: Path
) -> None:
    frame, reference = tmp_path / "frame.png", tmp_path / "style.jpg"
    Image.new("RGB", (640, 360), (200, 120, 40)).save(frame)
    Image.new("RGB", (320, 320), (20, 40, 200)).save(reference)
    gateway = ("--gateway", mesh.address("gateway"))

    result = aiprod(
        "render", "A fox in the snow", "--duration", "4", "--first-frame", str(frame),
        "--reference-image", str(reference), "--explain", "--json", *gateway, api_key=mesh.api_key,
    )  # fmt: skip

    job = json_of(result)
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    # Sent as the files' bytes, the media type read from them.
    assert job["spec"]["first_frame"] == {
        "data": base64.b64encode(frame.read_bytes()).decode(),
        "mime_type": "image/png",
    }
    assert job["spec"]["reference_images"] == [
        {"data": base64.b64encode(reference.read_bytes()).decode(), "mime_type": "image/jpeg"}
    ]
    # The local renderer takes no first frame: the route plan says so, and the job went elsewhere.
    local = [estimate for estimate in job["explain"] if estimate["backend"] == "BACKEND_LOCAL"]
    assert any("does not take a first frame" in reason for e in local for reason in e["reasons"]), local
    assert job["backend"] in {"BACKEND_RUNWAY", "BACKEND_VEO"}

    # A file that cannot be read is a usage error, said before anything is sent.
    missing = aiprod(
        "quote", "A fox", "--first-frame", str(tmp_path / "none.png"), *gateway, api_key=mesh.api_key
    )
    assert missing.returncode == 2
    said = usage_error(missing.stderr)
    # (The path itself may be folded over two lines of the panel.)
    assert "Invalid value for '--first-frame': cannot read" in said and "No such file or directory" in said
    # What is not an image is the gateway's to refuse, naming the field.
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    refused = aiprod("quote", "A fox", "--first-frame", str(text), *gateway, api_key=mesh.api_key)
    assert refused.returncode == 2
    assert "spec.first_frame.data: is not a PNG, JPEG or WebP image" in refused.stderr


def test_a_renders_floor_deadline_and_seed_from_the_command_line_reach_the_job_and_its_route(
    mesh: Mesh,
) -> None:
    deadline = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    gateway = ("--gateway", mesh.address("gateway"))

    result = aiprod(
        "render", "A heron in the reeds", "--duration", "4", "--quality-floor", "0.9", "--deadline", deadline,
        "--seed", "7", "--explain", "--json", *gateway, api_key=mesh.api_key,
    )  # fmt: skip

    job = json_of(result)
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    constraints = job["spec"]["constraints"]
    assert (constraints["quality_floor"], constraints["deadline"]) == (0.9, deadline)
    assert job["spec"]["seed"] == "7"
    # The floor asked, stricter than the tier's, is the one the backends were ranked against.
    reasons = [reason for estimate in job["explain"] for reason in estimate["reasons"]]
    assert any("under the floor 0.90" in reason for reason in reasons), reasons
    shown = aiprod("jobs", "get", job["job_id"], *gateway, api_key=mesh.api_key)
    assert re.search(r"quality floor[\s│]+0\.90", shown.stdout), shown.stdout
    assert re.search(rf"deadline[\s│]+{deadline[:10]} {deadline[11:19]} UTC", shown.stdout), shown.stdout


def test_a_render_of_the_callers_own_shots_plays_them_in_order_each_after_the_one_before(
    mesh: Mesh, tmp_path: Path
) -> None:
    frame = tmp_path / "dawn.png"
    Image.new("RGB", (640, 360), (250, 200, 120)).save(frame)
    out = tmp_path / "beach.mp4"

    result = aiprod(
        "render", "A day at the beach", "--shot", "4:Waves at dawn", "--shot", "4: Gulls at noon ",
        "--continuous", "--first-frame", str(frame), "--out", str(out), "--json",
        "--gateway", mesh.address("gateway"), api_key=mesh.api_key,
    )  # fmt: skip

    job = json_of(result)
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    shots = job["plan"]["shots"]
    assert [(shot["prompt"], shot["duration_seconds"]) for shot in shots] == [
        ("Waves at dawn", 4.0),
        ("Gulls at noon", 4.0),
    ]
    # The first frame opens the first shot; the second starts where the first ended.
    assert shots[0]["first_frame"]["data"] == base64.b64encode(frame.read_bytes()).decode()
    assert (shots[0].get("continuous", False), shots[1].get("continuous")) == (False, True)
    assert job["spec"]["duration_seconds"] == 8.0
    # One film of both, 8 s at 24 frames a second.
    with av.open(str(out)) as container:
        assert container.streams.video[0].frames == 192

    bad = aiprod("quote", "A day at the beach", "--shot", "four:Waves", api_key=mesh.api_key)
    assert bad.returncode == 2
    assert "Invalid value for '--shot': 'four:Waves' is not SECONDS:PROMPT" in usage_error(bad.stderr)


def test_render_explain_goes_on_without_a_plan(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{closed_port()}"
    assert explain_route(build_spec("A kite over a beach"), address, mesh.api_key) is None
    said = capsys.readouterr().err
    assert f"no route plan: the gateway cannot be reached at {address} (UNAVAILABLE)" in said
    assert "rendering anyway" in said


def test_render_explain_table_and_every_fallback_in_the_progress(mesh: Mesh) -> None:
    # The sandbox fails this render halfway on every provider: Runway first (preferred), then Veo, the
    # only other backend that renders 4 s above the floor; then nothing is left.
    result = aiprod(
        "render",
        "[sandbox:fail] A paper boat sailing across a sunlit pond",
        "--backend",
        "runway",
        "--duration",
        "4",
        "--explain",
        "--gateway",
        mesh.address("gateway"),
        api_key=mesh.api_key,
    )

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    notes = result.stderr
    assert "Route plan" in notes
    # Each candidate is a backend's model at a resolution.
    assert re.search(r"^\s*1\s+runway gen4\.5 720p\s+yes\s", notes, re.MULTILINE), notes
    assert re.search(r"^\s*-\s+local local-synth-v1 720p\s+no\s.*under the floor", notes, re.MULTILINE), notes
    assert re.search(r"routed to runway: .*preferred by the request or its quote", notes), notes
    assert re.search(r"falling back from runway to veo: [A-Z_]+: \S", notes), notes
    assert "routed to veo: " in notes
    # The plan comes before the render starts.
    assert notes.index("Route plan") < notes.index("routed to runway")


def test_a_backend_asked_for_that_does_not_qualify_is_said_with_its_reasons(mesh: Mesh) -> None:
    # Replicate's model renders 6 s only.
    result = aiprod(
        "render", "A kite over a beach", "--backend", "replicate", "--duration", "4", "--json",
        "--gateway", mesh.address("gateway"), api_key=mesh.api_key,
    )  # fmt: skip
    job = json_of(result)
    assert job["backend"] != "BACKEND_REPLICATE"
    note = re.search(
        r"note: replicate was asked for but does not qualify \((.+)\): routing to (\w+)", result.stderr
    )
    assert note, result.stderr
    assert "duration" in note.group(1)
    assert f"BACKEND_{note.group(2).upper()}" == job["backend"]


def test_a_model_asked_for_is_the_route_or_said_not_to_qualify(mesh: Mesh) -> None:
    gateway = ("--gateway", mesh.address("gateway"))
    # This mesh's Runway offers gen4.5 alone.
    taken = aiprod(
        "render", "A kite over a beach", "--backend", "runway", "--model", "gen4.5", "--duration", "4", "--json",
        *gateway, api_key=mesh.api_key,
    )  # fmt: skip
    job = json_of(taken)
    assert (job["spec"]["constraints"]["preferred_model"], job["quote"]["model"]) == ("gen4.5", "gen4.5")
    assert "note:" not in taken.stderr

    other = aiprod(
        "quote", "A kite over a beach", "--backend", "runway", "--model", "gen4_turbo", "--duration", "4",
        "--json", *gateway, api_key=mesh.api_key,
    )  # fmt: skip
    assert json_of(other)["model"] != "gen4_turbo"

    alone = aiprod("quote", "A kite", "--model", "gen4.5", *gateway, api_key=mesh.api_key)
    assert alone.returncode == 2
    assert "Invalid value for --model: it needs the backend that has the model (--backend)" in usage_error(
        alone.stderr
    )
