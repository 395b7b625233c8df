"""The `aiprod` CLI: against a fake gateway in-process, and end to end against `aiprod up`."""

import json
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import av
import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from helpers.cli import AIPROD, aiprod, aiprod_up, alive, cli_environment, gateway_address
from typer.testing import CliRunner

from aiprod.common.v1 import event_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod_cli.main import app
from aiprod_cli.up import port_in_use
from aiprod_kit.mesh import Mesh

JOB_ID = "job_" + "0" * 32
# What the CLI tests against the fake gateway send as their API key (the fake takes any).
FAKE_KEY = "aiprod_fake_0123456789"


# --- Against a fake gateway: the CLI's own behaviour, whatever the services do ---------------------


def _event(sequence: int, state: int, render: event_pb2.RenderEvent) -> gateway_pb2.WatchRenderJobResponse:
    return gateway_pb2.WatchRenderJobResponse(
        event=gateway_pb2.JobEvent(job_id=JOB_ID, sequence=sequence, state=state, render=render)
    )


class FakeGateway(gateway_pb2_grpc.GatewayServiceServicer):
    """One job that succeeds in four events; the first watch stream breaks (UNAVAILABLE) after two."""

    def __init__(self, video: Path) -> None:
        self.after_sequences: list[int] = []
        # A create of a prompt starting "[slow]" answers only once released: the request ids it got.
        self.slow_creates: list[str] = []
        self.release = threading.Event()
        # The authorization metadata of every call.
        self.authorizations: list[str] = []
        self.events = [
            _event(1, job_pb2.JOB_STATE_RUNNING, event_pb2.RenderEvent(routed=event_pb2.RouteDecision(backend=1))),
            _event(2, job_pb2.JOB_STATE_RUNNING, event_pb2.RenderEvent(progress=event_pb2.RenderProgress(fraction=0.5))),
            _event(3, job_pb2.JOB_STATE_RUNNING, event_pb2.RenderEvent(progress=event_pb2.RenderProgress(fraction=1.0))),
            _event(4, job_pb2.JOB_STATE_SUCCEEDED, event_pb2.RenderEvent(succeeded=render_pb2.RenderOutput())),
        ]  # fmt: skip
        self.final = gateway_pb2.RenderJob(
            job_id=JOB_ID,
            state=job_pb2.JOB_STATE_SUCCEEDED,
            last_sequence=4,
            progress=1.0,
            result=render_pb2.RenderOutput(video=render_pb2.VideoArtifact(uri=video.as_uri())),
        )

    def _authorize(self, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        self.authorizations.append(metadata.get("authorization", ""))
        if metadata.get("authorization") == "Bearer revoked":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "the API key aiprod_revoked was revoked")

    def CreateRenderJob(
        self, request: gateway_pb2.CreateRenderJobRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.CreateRenderJobResponse:
        self._authorize(context)
        if not request.spec.prompt:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field="spec.prompt", description="must not be empty"
                    )
                ]
            )
            detail = any_pb2.Any()
            detail.Pack(bad_request)
            status = status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT, message="spec.prompt: must not be empty", details=[detail]
            )
            context.abort_with_status(rpc_status.to_status(status))
        if request.spec.prompt.startswith("[slow]"):
            self.slow_creates.append(request.request_id)
            self.release.wait(60)
        return gateway_pb2.CreateRenderJobResponse(
            job=gateway_pb2.RenderJob(
                job_id=JOB_ID, request_id=request.request_id, state=job_pb2.JOB_STATE_QUEUED
            )
        )

    def WatchRenderJob(
        self, request: gateway_pb2.WatchRenderJobRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.WatchRenderJobResponse]:
        self._authorize(context)
        self.after_sequences.append(request.after_sequence)
        yield gateway_pb2.WatchRenderJobResponse(
            job=gateway_pb2.RenderJob(job_id=JOB_ID, state=job_pb2.JOB_STATE_RUNNING)
        )
        for event in self.events[request.after_sequence :]:
            yield event
            if len(self.after_sequences) == 1 and event.event.sequence == 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "gateway restarting")

    def GetRenderJob(
        self, request: gateway_pb2.GetRenderJobRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetRenderJobResponse:
        self._authorize(context)
        return gateway_pb2.GetRenderJobResponse(job=self.final)


@pytest.fixture
def fake_gateway(tmp_path: Path) -> Iterator[tuple[FakeGateway, str]]:
    video = tmp_path / "rendered.mp4"
    video.write_bytes(b"not really an mp4")
    servicer = FakeGateway(video)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_render_resumes_after_the_stream_breaks(
    fake_gateway: tuple[FakeGateway, str], tmp_path: Path
) -> None:
    servicer, address = fake_gateway
    out = tmp_path / "copies" / "boat.mp4"

    result = CliRunner().invoke(
        app,
        ["render", "a boat", "--gateway", address, "--json", "--out", str(out)],
        env={"AIPROD_API_KEY": FAKE_KEY},
    )

    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["state"] == "JOB_STATE_SUCCEEDED"
    assert printed["video_path"] == str(out.resolve())
    assert out.read_bytes() == b"not really an mp4"
    # Resumed after the last event seen, so nothing was missed or shown twice.
    assert servicer.after_sequences == [0, 2]
    # Every call, the resumed watch included, carried the key.
    assert servicer.authorizations == [f"Bearer {FAKE_KEY}"] * 4


def test_render_prints_the_video_path_last(fake_gateway: tuple[FakeGateway, str], tmp_path: Path) -> None:
    _, address = fake_gateway

    result = CliRunner().invoke(app, ["render", "a boat", "--gateway", address, "--api-key", FAKE_KEY])

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(tmp_path / "rendered.mp4")
    assert "SUCCEEDED" in result.stderr


def test_ctrl_c_before_the_gateway_answers_gives_the_request_id_that_gets_the_job_without_another(
    fake_gateway: tuple[FakeGateway, str], tmp_path: Path
) -> None:
    servicer, address = fake_gateway
    render = subprocess.Popen(
        [str(AIPROD), "render", "[slow] A kite", "--gateway", address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_environment(FAKE_KEY),
    )
    try:
        deadline = time.monotonic() + 60
        while not servicer.slow_creates:
            assert render.poll() is None, render.communicate()
            assert time.monotonic() < deadline, "the create never reached the gateway"
            time.sleep(0.02)

        render.send_signal(signal.SIGINT)

        _, stderr = render.communicate(timeout=60)
    finally:
        servicer.release.set()
        if render.poll() is None:
            render.kill()
            render.wait()
    assert render.returncode == 1, stderr
    assert "interrupted before the gateway answered: the job may have been ordered" in stderr
    assert f"--request-id {servicer.slow_creates[0]} returns it rather than ordering another" in stderr


def test_bad_input_reports_the_field_and_exits_2(fake_gateway: tuple[FakeGateway, str]) -> None:
    _, address = fake_gateway

    result = CliRunner().invoke(app, ["render", "", "--gateway", address, "--json", "--api-key", FAKE_KEY])

    assert result.exit_code == 2
    assert result.stdout == ""
    assert "INVALID_ARGUMENT" in result.stderr
    assert "spec.prompt: must not be empty" in result.stderr


def test_a_command_without_a_key_says_how_to_get_one(fake_gateway: tuple[FakeGateway, str]) -> None:
    servicer, address = fake_gateway

    for args in (["render", "a boat"], ["jobs", "list"], ["quote", "a boat"], ["presets"], ["usage"]):
        result = CliRunner().invoke(app, [*args, "--gateway", address], env={"AIPROD_API_KEY": ""})

        assert result.exit_code == 2, (args, result.output)
        assert result.stdout == ""
        # One line, saying what to export and where the key comes from.
        assert result.stderr.splitlines() == [
            "error: no API key: export AIPROD_API_KEY=<key> as `aiprod up` prints it (or pass --api-key)"
        ]
    assert servicer.authorizations == []  # nothing was called


def test_a_refused_key_gets_a_hint_and_is_never_printed(fake_gateway: tuple[FakeGateway, str]) -> None:
    _, address = fake_gateway

    result = CliRunner().invoke(
        app, ["render", "a boat", "--gateway", address], env={"AIPROD_API_KEY": "revoked"}
    )

    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "error: UNAUTHENTICATED: the API key aiprod_revoked was revoked"
    assert "export AIPROD_API_KEY as `aiprod up` prints it" in lines[1]
    assert "Bearer" not in result.output


def test_help_never_shows_a_key() -> None:
    for args in (["render", "--help"], ["admin", "keys", "list", "--help"]):
        result = CliRunner().invoke(
            app, args, env={"AIPROD_API_KEY": "aiprod_zqzq_one", "AIPROD_ADMIN_KEY": "admin-zqzq-two"}
        )
        assert result.exit_code == 0
        assert "AIPROD_API_KEY" in result.stdout or "AIPROD_ADMIN_KEY" in result.stdout
        assert "zqzq" not in result.stdout


def test_port_in_use() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_in_use(port)
    assert not port_in_use(port)


# --- End to end: `aiprod up` on free ports, and the CLI as users run it -----------------------------


@pytest.fixture(scope="module")
def up_info(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    with aiprod_up(tmp_path_factory.mktemp("up")) as (_, info):
        yield info


@pytest.fixture(scope="module")
def up_gateway(up_info: dict) -> str:
    return gateway_address(up_info)


@pytest.fixture(scope="module")
def up_key(up_info: dict) -> str:
    """The development tenant's key `aiprod up --json` printed."""
    return up_info["api_key"]


def test_render_end_to_end(up_gateway: str, up_key: str, tmp_path: Path) -> None:
    out = tmp_path / "x.mp4"

    rendered = aiprod(
        "render",
        "A lighthouse at dusk",
        "--duration",
        "1",
        "--json",
        "--gateway",
        up_gateway,
        "--out",
        str(out),
        api_key=up_key,
    )

    assert rendered.returncode == 0, rendered.stderr
    job = json.loads(rendered.stdout)
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert job["video_path"] == str(out.resolve())
    with av.open(str(out)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 24
    assert {(frame.width, frame.height) for frame in frames} == {(1280, 720)}

    listed = aiprod("jobs", "list", "--state", "succeeded", "--json", "--gateway", up_gateway, api_key=up_key)
    assert listed.returncode == 0, listed.stderr
    assert job["job_id"] in [listed_job["job_id"] for listed_job in json.loads(listed.stdout)["jobs"]]

    got = aiprod("jobs", "get", job["job_id"], "--json", "--gateway", up_gateway, api_key=up_key)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["state"] == "JOB_STATE_SUCCEEDED"

    cancelled = aiprod("jobs", "cancel", job["job_id"], "--gateway", up_gateway, api_key=up_key)
    assert cancelled.returncode == 2
    assert "FAILED_PRECONDITION" in cancelled.stderr


def test_a_backend_asked_for_that_does_not_qualify_is_said_and_the_render_goes_on(
    up_gateway: str, up_key: str
) -> None:
    # `aiprod up` without --sandbox runs the local renderer only.
    rendered = aiprod(
        "render", "A lighthouse at dusk", "--backend", "runway", "--duration", "1", "--json",
        "--gateway", up_gateway, api_key=up_key,
    )  # fmt: skip

    assert rendered.returncode == 0, rendered.stderr
    assert json.loads(rendered.stdout)["backend"] == "BACKEND_LOCAL"
    assert re.search(
        r"note: runway was asked for but does not qualify \(.+\): routing to local", rendered.stderr
    ), rendered.stderr


def test_empty_prompt_exits_2_and_names_the_field(up_gateway: str, up_key: str) -> None:
    result = aiprod("render", "", "--json", "--gateway", up_gateway, api_key=up_key)

    assert result.returncode == 2
    assert result.stdout == ""
    assert "spec.prompt" in result.stderr


def test_up_json_has_the_development_key_and_the_admin_key(up_info: dict, up_gateway: str) -> None:
    assert up_info["tenant_id"] == "dev"
    assert up_info["api_key"].startswith("aiprod_")
    assert up_info["admin_key"]

    jobs = aiprod("jobs", "list", "--json", "--gateway", up_gateway, api_key=up_info["api_key"])
    tenants = aiprod(
        "admin", "tenants", "list", "--json", "--gateway", up_gateway, admin_key=up_info["admin_key"]
    )

    assert jobs.returncode == 0, jobs.stderr
    assert tenants.returncode == 0, tenants.stderr
    assert "dev" in [tenant["tenant_id"] for tenant in json.loads(tenants.stdout)["tenants"]]


def test_up_prints_the_keys_on_lines_of_their_own(tmp_path: Path) -> None:
    """`aiprod up` as people run it: the table, then AIPROD_API_KEY=<key> and AIPROD_ADMIN_KEY=<key> on
    lines of their own (ready for `export`), and how to use them."""
    stderr_path = tmp_path / "up.stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [str(AIPROD), "up", "--free-ports", "--data-dir", str(tmp_path / "data")],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=cli_environment(),
        )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("AIPROD_ADMIN_KEY="):
            line = process.stdout.readline()
            if not line:
                pytest.fail(f"aiprod up ended early: {lines}\n{stderr_path.read_text()}")
            lines.append(line.rstrip("\n"))
        _wait_for_text(stderr_path, "The mesh is up")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    keys = [line for line in lines if line.startswith("AIPROD_")]
    assert [line.partition("=")[0] for line in keys] == ["AIPROD_API_KEY", "AIPROD_ADMIN_KEY"]
    api_key = keys[0].partition("=")[2]
    assert re.fullmatch(r"aiprod_[0-9a-f]+_[\w-]+", api_key), api_key
    assert keys[1].partition("=")[2]
    assert "gateway" in "\n".join(lines)  # the services' table came first
    notes = stderr_path.read_text()
    assert f"export AIPROD_API_KEY={api_key}" in notes
    assert "The mesh is up" in notes


def test_up_stops_every_service_on_sigterm(tmp_path: Path) -> None:
    with aiprod_up(tmp_path) as (process, info):
        pids = [service["pid"] for service in info["services"]]
        assert len(pids) == 4
        assert all(alive(pid) for pid in pids)

        process.send_signal(signal.SIGTERM)

        assert process.wait(60) == 0
        assert not [pid for pid in pids if alive(pid)]


# --- Following a render through a gateway restart and a Ctrl-C --------------------------------------


@pytest.fixture(scope="module")
def paced_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    # Slow renders (4 s of video take 8 s) leave time to break the watch in the middle of one.
    mesh = Mesh(
        tmp_path_factory.mktemp("paced"), free_ports=True, environment={"AIPROD_LOCAL_RENDER_PACE_FPS": "12"}
    )
    mesh.start()
    yield mesh
    mesh.stop()


def _start_render(mesh: Mesh, stderr_path: Path, *args: str) -> subprocess.Popen[str]:
    gateway = mesh.address("gateway")
    with stderr_path.open("w") as stderr:
        return subprocess.Popen(
            [str(AIPROD), "render", "A kite over the dunes", "--duration", "4", "--gateway", gateway, *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=cli_environment(mesh.api_key),
        )


def _wait_for_text(path: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} never appeared in:\n{path.read_text()}")
        time.sleep(0.05)


def test_render_resumes_after_a_gateway_restart(paced_mesh: Mesh, tmp_path: Path) -> None:
    out = tmp_path / "kite.mp4"
    stderr_path = tmp_path / "render.stderr"
    render = _start_render(paced_mesh, stderr_path, "--out", str(out))
    _wait_for_text(stderr_path, "routed to")

    paced_mesh.kill("gateway")
    paced_mesh.start_service("gateway")

    stdout, _ = render.communicate(timeout=120)
    assert render.returncode == 0, stderr_path.read_text()
    assert "reconnecting" in stderr_path.read_text()
    assert stdout.splitlines()[-1] == str(out)
    with av.open(str(out)) as container:
        assert container.streams.video[0].frames == 96


def test_ctrl_c_leaves_the_job_running_and_jobs_watch_follows_it_again(
    paced_mesh: Mesh, tmp_path: Path
) -> None:
    gateway = paced_mesh.address("gateway")
    stderr_path = tmp_path / "render.stderr"
    render = _start_render(paced_mesh, stderr_path)
    _wait_for_text(stderr_path, "routed to")

    render.send_signal(signal.SIGINT)

    render.communicate(timeout=60)
    assert render.returncode == 1
    left = re.search(r"job (job_\w+) keeps running: `aiprod jobs watch (job_\w+)`", stderr_path.read_text())
    assert left and left.group(1) == left.group(2), stderr_path.read_text()
    job_id = left.group(1)
    got = aiprod("jobs", "get", job_id, "--json", "--gateway", gateway, api_key=paced_mesh.api_key)
    assert json.loads(got.stdout)["state"] in {"JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"}

    out = tmp_path / "kite.mp4"
    watched = aiprod(
        "jobs", "watch", job_id, "--out", str(out), "--gateway", gateway, api_key=paced_mesh.api_key
    )

    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.splitlines()[-1] == str(out)
    # The story so far, then the end.
    assert "routed to local" in watched.stderr
    assert f"{job_id}: SUCCEEDED" in watched.stderr
    with av.open(str(out)) as container:
        assert container.streams.video[0].frames == 96
    # An ended job is followed no further: its video at once, as JSON too.
    again = aiprod("jobs", "watch", job_id, "--json", "--gateway", gateway, api_key=paced_mesh.api_key)
    assert again.returncode == 0, again.stderr
    answer = json.loads(again.stdout)
    assert (answer["job_id"], answer["state"]) == (job_id, "JOB_STATE_SUCCEEDED")
    assert Path(answer["video_path"]).read_bytes() == out.read_bytes()
