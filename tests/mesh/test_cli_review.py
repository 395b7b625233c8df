"""The CLI's presets, quotes and review step, run as users do against a real mesh (the local renderer):
`aiprod presets`, `aiprod quote` and a render held to its quote, `aiprod render` of a preset with an
approval step showing the plan, the quote and how to approve, then following the job once
`aiprod jobs approve` approved it; `aiprod jobs edit` against a version and `aiprod jobs revisions`."""

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from helpers.cli import AIPROD, aiprod, cli_environment

from aiprod.common.v1 import render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod_kit.mesh import Mesh

APPROVE = re.compile(r"aiprod jobs approve (job_[0-9a-f]{32}) --version (\d+)")


def run(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    """The command against the mesh's gateway, as the development tenant."""
    return aiprod(*args, "--gateway", mesh.address("gateway"), api_key=mesh.api_key)


def json_of(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@contextmanager
def started(mesh: Mesh, stderr_path: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`aiprod ARGS` against the mesh's gateway, running while the block runs; killed after it if it has
    not ended (a test that failed while it waited)."""
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [str(AIPROD), *args, "--gateway", mesh.address("gateway")],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=cli_environment(mesh.api_key),
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for(
    path: Path, pattern: re.Pattern[str] | str, after: int = 0, timeout: float = 60
) -> re.Match[str]:
    """The first match of pattern in the file from character `after` on, once it is there."""
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
    deadline = time.monotonic() + timeout
    while (match := compiled.search(path.read_text(), after)) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"{compiled.pattern!r} never appeared in:\n{path.read_text()}")
        time.sleep(0.05)
    return match


def test_presets_lists_limits_prices_and_enums_as_words(mesh: Mesh) -> None:
    listed = json_of(run(mesh, "presets", "--json"))["presets"]
    by_name = {preset["name"]: preset for preset in listed}
    assert set(by_name) == {"quick_social", "brand_campaign", "premium_spot"}
    assert by_name["brand_campaign"]["requires_approval"] is True
    assert by_name["premium_spot"]["priority"] == "PRIORITY_HIGH"
    assert by_name["quick_social"]["pipeline"] == "PIPELINE_FAST"
    assert int(by_name["quick_social"]["max_price_per_minute"]["amount_micros"]) > 0

    table = run(mesh, "presets")
    assert table.returncode == 0, table.stderr
    for heading in ("preset", "pipeline", "floor", "max duration", "default duration", "price limit/min"):
        assert heading in table.stdout
    rows = {
        "quick_social": r"fast\s+0\.60\s+30 s\s+5 s\s+[\d.]+ USD\s+no\s+low",
        "brand_campaign": r"full\s+0\.80\s+120 s\s+8 s\s+[\d.]+ USD\s+required\s+medium",
        "premium_spot": r"full\s+0\.90\s+180 s\s+8 s\s+[\d.]+ USD\s+required\s+high",
    }
    for name, row in rows.items():
        assert re.search(rf"^\s*{name}\s+{row}\s*$", table.stdout, re.MULTILINE), table.stdout


def test_quote_shows_the_route_the_price_and_every_estimate_and_a_render_holds_to_it(mesh: Mesh) -> None:
    prompt, duration = "A heron in the reeds", "1"
    quote = json_of(run(mesh, "quote", prompt, "--duration", duration, "--json"))
    assert re.fullmatch(r"quote_[0-9a-f]{32}", quote["quote_id"])
    assert quote["expire_time"]
    assert quote["backend"] == "BACKEND_LOCAL"
    assert "amount_micros" in quote["price"] and "amount_micros" in quote["max_cost"]
    (local,) = [estimate for estimate in quote["estimates"] if estimate["backend"] == "BACKEND_LOCAL"]
    assert local["qualifies"] is True
    assert local["reasons"]

    table = run(mesh, "quote", prompt, "--duration", duration)
    assert table.returncode == 0, table.stderr
    for name in ("quote", "expires", "route", "price", "at most"):
        assert re.search(rf"^\s*{name}\s+\S", table.stdout, re.MULTILINE), table.stdout
    assert re.search(r"^\s*route\s+local local-synth-v1 720p\s*$", table.stdout, re.MULTILINE), table.stdout
    assert "Estimates" in table.stdout
    assert re.search(r"^\s*1\s+local local-synth-v1 720p\s+yes\s+[\d.]+ USD", table.stdout, re.MULTILINE), (
        table.stdout
    )
    assert "--quote-id quote_" in table.stderr

    # The same prompt and options with --quote-id: the job holds that quote.
    job = json_of(
        run(mesh, "render", prompt, "--duration", duration, "--quote-id", quote["quote_id"], "--json")
    )
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert job["quote"]["quote_id"] == quote["quote_id"]
    assert job["backend"] == "BACKEND_LOCAL"
    # A quote binds one job: another request naming it is refused, saying why.
    again = run(mesh, "render", prompt, "--duration", duration, "--quote-id", quote["quote_id"], "--json")
    assert again.returncode == 2
    assert again.stdout == ""
    assert "FAILED_PRECONDITION" in again.stderr


def test_render_in_review_shows_plan_quote_and_approve_command_then_follows_the_job(
    mesh: Mesh, tmp_path: Path
) -> None:
    notes = tmp_path / "render.stderr"
    out = tmp_path / "campaign.mp4"
    with started(
        mesh,
        notes,
        "render",
        "A lighthouse at dawn",
        "--preset",
        "brand_campaign",
        "--duration",
        "1",
        "--out",
        str(out),
    ) as render:
        approve = wait_for(notes, APPROVE)
        job_id, version = approve.group(1), approve.group(2)
        assert version == "1"
        shown = notes.read_text()
        assert "Plan, version 1" in shown
        assert "A lighthouse at dawn" in shown
        for name in ("quote", "route", "price", "at most"):
            assert re.search(rf"^\s*{name}\s+\S", shown, re.MULTILINE), shown
        assert f"job {job_id} awaits approval of plan version 1" in shown
        assert "Waiting for approval" in shown

        # An edit while it waits: the render shows the new version and the command that approves it.
        edited = run(mesh, "jobs", "edit", job_id, "--prompt", "A lighthouse at dusk")
        assert edited.returncode == 0, edited.stderr
        assert re.search(r"plan version 2\b", edited.stdout), edited.stdout
        assert f"aiprod jobs approve {job_id} --version 2" in edited.stderr
        wait_for(notes, r"plan version 2 by aiprod_\w+ \(changed: shots\[0\]\.prompt")
        wait_for(notes, rf"aiprod jobs approve {job_id} --version 2")

        # Approving the version first shown is refused: the plan changed since.
        stale = run(mesh, "jobs", "approve", job_id, "--version", "1")
        assert stale.returncode == 2
        assert "ABORTED" in stale.stderr
        assert "it is now at version 2" in stale.stderr
        assert render.poll() is None  # still waiting

        # Without --version, the current one is read and approved.
        approved = run(mesh, "jobs", "approve", job_id)
        assert approved.returncode == 0, approved.stderr
        assert f"approved plan version 2 of {job_id}" in approved.stderr

        stdout, _ = render.communicate(timeout=120)
    shown = notes.read_text()
    assert render.returncode == 0, shown
    assert stdout.splitlines()[-1] == str(out)
    assert out.stat().st_size > 0
    assert re.search(r"approved: plan version 2 by aiprod_\w+", shown), shown
    # The render's own progress came after the approval.
    assert shown.index("approved: plan version 2") < shown.index("SUCCEEDED")
    job = json_of(run(mesh, "jobs", "get", job_id, "--json"))
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert job["plan"]["shots"][0]["prompt"] == "A lighthouse at dusk"


def test_a_job_in_review_cancelled_ends_the_render(mesh: Mesh, tmp_path: Path) -> None:
    """--review asks for the step on a preset without one; with --json, stderr still says how to approve."""
    notes = tmp_path / "render.stderr"
    with started(mesh, notes, "render", "A paper lantern", "--duration", "1", "--review", "--json") as render:
        job_id = wait_for(notes, APPROVE).group(1)
        assert "Plan, version" not in notes.read_text()  # --json: one line, no tables

        cancelled = run(mesh, "jobs", "cancel", job_id, "--reason", "not this one")
        assert cancelled.returncode == 0, cancelled.stderr

        stdout, _ = render.communicate(timeout=60)
    assert render.returncode == 1
    job = json.loads(stdout)
    assert job["state"] == "JOB_STATE_CANCELLED"
    assert job["video_path"] is None
    assert re.search(r"cancelled in review by aiprod_\w+: not this one", notes.read_text()), notes.read_text()


@pytest.fixture
def job_in_review(mesh: Mesh) -> str:
    """A job of the development tenant waiting for approval at plan version 1, made through the API."""
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        spec = render_pb2.RenderSpec(prompt="A tram in the rain", duration_seconds=1, preset="brand_campaign")
        created = stub.CreateRenderJob(
            gateway_pb2.CreateRenderJobRequest(spec=spec),
            metadata=(("authorization", f"Bearer {mesh.api_key}"),),
            timeout=30,
        )
    return created.job.job_id


def test_edit_against_a_version_then_the_revisions(mesh: Mesh, job_in_review: str) -> None:
    job_id = job_in_review

    first = json_of(
        run(mesh, "jobs", "edit", job_id, "--prompt", "A tram in the snow", "--version", "1", "--json")
    )
    assert first["plan_version"] == "2"
    assert first["plan"]["shots"][0]["prompt"] == "A tram in the snow"

    # A second reviewer still at version 1: refused, nothing changed, the current version said.
    stale = run(mesh, "jobs", "edit", job_id, "--prompt", "A tram at night", "--version", "1")
    assert stale.returncode == 2
    assert "ABORTED" in stale.stderr
    assert "it is now at version 2" in stale.stderr
    assert f"aiprod jobs revisions {job_id}" in stale.stderr

    # Without --version: against the current one.
    second = json_of(run(mesh, "jobs", "edit", job_id, "--duration", "2", "--json"))
    assert second["plan_version"] == "3"
    assert second["plan"]["shots"][0]["prompt"] == "A tram in the snow"
    assert second["plan"]["shots"][0]["duration_seconds"] == 2

    revisions = json_of(run(mesh, "jobs", "revisions", job_id, "--json"))["revisions"]
    assert [revision["plan_version"] for revision in revisions] == ["1", "2", "3"]
    assert revisions[0]["author"] == "aiprod"
    assert revisions[1]["changes"] == ["shots[0].prompt"]
    assert revisions[2]["changes"] == ["shots[0].duration_seconds"]
    prefix = "_".join(mesh.api_key.split("_")[:2])
    assert {revision["author"] for revision in revisions[1:]} == {prefix}

    table = run(mesh, "jobs", "revisions", job_id)
    assert table.returncode == 0, table.stderr
    for heading in ("version", "when", "author", "changes", "price"):
        assert heading in table.stdout
    assert re.search(
        r"^\s*1\s+\d{4}-\d\d-\d\d [\d:]+ UTC\s+aiprod\s+created\s+[\d.]+ USD", table.stdout, re.M
    )
    assert re.search(rf"^\s*2\s+\S+ \S+ UTC\s+{prefix}\s+shots\[0\]\.prompt\s+[\d.]+ USD", table.stdout, re.M)

    nothing = run(mesh, "jobs", "edit", job_id)
    assert nothing.returncode == 2
    assert "nothing to change" in nothing.stderr

    assert run(mesh, "jobs", "cancel", job_id).returncode == 0
    ended = run(mesh, "jobs", "approve", job_id)
    assert ended.returncode == 2
    assert "FAILED_PRECONDITION" in ended.stderr


def test_edit_adds_moves_and_removes_shots_each_a_new_version(mesh: Mesh, job_in_review: str) -> None:
    job_id = job_in_review

    def shots(job: dict) -> list[tuple[str, float]]:
        return [(shot["prompt"], shot["duration_seconds"]) for shot in job["plan"]["shots"]]

    added = json_of(run(mesh, "jobs", "edit", job_id, "--add", "2:A close-up of the driver", "--json"))
    assert shots(added) == [("A tram in the rain", 1), ("A close-up of the driver", 2)]
    assert added["plan"]["shots"][1]["aspect_ratio"] == added["plan"]["shots"][0]["aspect_ratio"]
    inserted = json_of(
        run(mesh, "jobs", "edit", job_id, "--add", "1:The depot at dawn", "--at", "0", "--json")
    )
    assert shots(inserted)[0] == ("The depot at dawn", 1)

    # Moved, and its prompt changed in the same version.
    moved = json_of(
        run(
            mesh,
            "jobs",
            "edit",
            job_id,
            "--shot",
            "2",
            "--move-to",
            "0",
            "--prompt",
            "The driver, close",
            "--json",
        )
    )
    assert shots(moved) == [("The driver, close", 2), ("The depot at dawn", 1), ("A tram in the rain", 1)]
    removed = json_of(run(mesh, "jobs", "edit", job_id, "--shot", "1", "--remove", "--json"))
    assert shots(removed) == [("The driver, close", 2), ("A tram in the rain", 1)]
    assert removed["plan_version"] == "5"

    # What names no place, or asks two changes of the list at once, changes nothing.
    for args, said in (
        (("--shot", "2", "--remove"), "--shot 2: the plan has 2 shot(s), from 0"),
        (("--add", "1:x", "--at", "3"), "--at 3: the plan has 2 shot(s); a shot goes at 0 to 2"),
        (("--add", "1:x", "--remove"), "one change of the shots at a time"),
        (("--add", "1:x", "--prompt", "y"), "--add changes the list of shots"),
        (("--at", "1",), "--at places the shot --add adds"),
    ):  # fmt: skip
        refused = run(mesh, "jobs", "edit", job_id, *args)
        assert (refused.returncode, said in refused.stderr) == (2, True), refused.stderr
    assert json_of(run(mesh, "jobs", "get", job_id, "--json"))["plan_version"] == "5"


def interrupted_in_review(mesh: Mesh, tmp_path: Path, *args: str) -> tuple[str, str]:
    """A render of a job in review, stopped by Ctrl-C while it waits for approval: the job, what it said."""
    notes = tmp_path / "render.stderr"
    with started(mesh, notes, "render", *args) as render:
        job_id = wait_for(notes, APPROVE).group(1)

        render.send_signal(signal.SIGINT)

        render.communicate(timeout=60)
    assert render.returncode == 1
    return job_id, notes.read_text()


def test_ctrl_c_in_review_leaves_the_job_waiting_and_jobs_watch_follows_it_to_its_video(
    mesh: Mesh, tmp_path: Path
) -> None:
    job_id, said = interrupted_in_review(
        mesh, tmp_path, "A glass of water", "--preset", "premium_spot", "--duration", "1"
    )

    assert f"job {job_id} still awaits approval: `aiprod jobs watch {job_id}` follows it" in said
    assert f"`aiprod jobs approve {job_id} --version 1` approves it" in said
    assert json_of(run(mesh, "jobs", "get", job_id, "--json"))["state"] == "JOB_STATE_AWAITING_APPROVAL"

    watch_notes = tmp_path / "watch.stderr"
    with started(mesh, watch_notes, "jobs", "watch", job_id) as watch:
        # The plan and how to approve it, as the render showed them.
        assert wait_for(watch_notes, APPROVE).groups() == (job_id, "1")
        assert run(mesh, "jobs", "approve", job_id).returncode == 0
        stdout, _ = watch.communicate(timeout=120)
    assert watch.returncode == 0, watch_notes.read_text()
    assert "approved: plan version 1" in watch_notes.read_text()
    video = Path(stdout.splitlines()[-1])
    assert video.suffix == ".mp4" and video.stat().st_size > 0


def test_jobs_watch_of_a_job_cancelled_in_review_exits_1_saying_so(mesh: Mesh, tmp_path: Path) -> None:
    job_id, _ = interrupted_in_review(mesh, tmp_path, "A glass of milk", "--review", "--duration", "1")
    watch_notes = tmp_path / "watch.stderr"
    with started(mesh, watch_notes, "jobs", "watch", job_id) as watch:
        wait_for(watch_notes, APPROVE)
        assert run(mesh, "jobs", "cancel", job_id, "--reason", "not this one").returncode == 0
        stdout, _ = watch.communicate(timeout=60)

    assert watch.returncode == 1
    assert stdout == ""
    assert f"job {job_id} CANCELLED" in watch_notes.read_text()
    # Watched again once ended: the same answer at once.
    again = run(mesh, "jobs", "watch", job_id)
    assert (again.returncode, again.stdout) == (1, "")
    assert f"job {job_id} CANCELLED" in again.stderr

    missing = run(mesh, "jobs", "watch", "job_" + "f" * 32)
    assert missing.returncode == 2
    assert "NOT_FOUND" in missing.stderr
