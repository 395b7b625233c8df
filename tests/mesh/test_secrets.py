"""Secrets never leak (issue 13, item 6): the whole mesh runs with provider credentials, a database
password, an admin key and tenant API keys, and hands out the sandbox's signed output URLs; every log
line (stderr and stdout of every process), every span (attributes, events, status, resource) and metric
point exported over OTLP, and every error a client is shown, are collected while it renders through each
provider, fails, refuses wrong keys, bad input and a tenant over its budget, manages keys, meets a
provider whose 401 echoes the token it was sent, and stops at start-up over a bad setting beside a
secret. None of the secrets, nor an obvious derivative of one, may be in any of it.
"""

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
from google.protobuf import text_format
from grpc_status import rpc_status
from helpers.mesh import wait_terminal
from helpers.postgres import admin_connection
from helpers.sandbox import FAST_PROVIDERS, SERVING, Sandbox, follow, health_watch, shot, wait_for_status
from helpers.sandbox import TERMINAL as RENDER_ENDED
from helpers.telemetry import OtlpReceiver
from psycopg import sql

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.failures import Reason
from aiprod_kit.mesh import Mesh
from aiprod_kit.redaction import REDACTED

# Recognisable fakes, fresh for each run, shaped as the real ones are.
RUN = secrets.token_hex(4)
RUNWAY_SECRET = f"key_{RUN}{secrets.token_hex(60)}"
REPLICATE_TOKEN = f"r8_{RUN}{secrets.token_urlsafe(27)}"
VEO_TOKEN = f"ya29.a0{RUN}{secrets.token_urlsafe(90)}"
DATABASE_PASSWORD = f"pgpw-{RUN}-{secrets.token_urlsafe(18)}"
ADMIN_KEY = f"admin-{RUN}-{secrets.token_urlsafe(24)}"
# A signature a client puts in a signed image URL it sends (refused: a loopback host).
CLIENT_SIGNATURE = f"sig{RUN}{secrets.token_hex(24)}"
# The sandbox's output URLs: /outputs/<unguessable token>.mp4, the token being what signs them.
OUTPUT_TOKEN = re.compile(r"outputs/([A-Za-z0-9_-]{24,})")

ENVIRONMENT = {
    **FAST_PROVIDERS,
    "AIPROD_LOG_LEVEL": "debug",
    # Points are cumulative and every process exports its last ones as it stops: seldom is enough.
    "OTEL_METRIC_EXPORT_INTERVAL": "5000",
    "OTEL_BSP_SCHEDULE_DELAY": "100",
    # A job today's budget cannot pay fails at once (BUDGET_EXHAUSTED) instead of waiting.
    "AIPROD_GATEWAY_BUDGET_POLICY": "fail",
    "AIPROD_GATEWAY_ADMIN_KEY": ADMIN_KEY,
    "AIPROD_SANDBOX_API_KEY": f"{RUNWAY_SECRET},{REPLICATE_TOKEN},{VEO_TOKEN}",
    "RUNWAYML_API_SECRET": RUNWAY_SECRET,
    "REPLICATE_API_TOKEN": REPLICATE_TOKEN,
    "AIPROD_VEO_ACCESS_TOKEN": VEO_TOKEN,
}


@dataclass
class Collected:
    """What the test saw: log lines by process, OTLP exports as text, errors as a client sees them."""

    # Secret name -> value; filled as secrets are made (API keys, output tokens).
    secrets: dict[str, str] = field(default_factory=dict)
    logs: dict[str, list[str]] = field(default_factory=dict)
    spans: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # What the client was shown that is not an error: the jobs (their failures and events included).
    answers: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    # What the renderers facing the echoing provider told their callers.
    provider_refusals: list[str] = field(default_factory=list)

    def refused(self, call: Callable[[], Any], code: grpc.StatusCode) -> grpc.RpcError:
        """Makes a call that must fail with code; keeps everything the error shows."""
        with pytest.raises(grpc.RpcError) as raised:
            call()
        error = raised.value
        assert error.code() == code, (error.code(), error.details())  # type: ignore[attr-defined]
        self.errors.append(f"{error.code()} {error.details()}")  # type: ignore[attr-defined]
        self.errors.append(error.debug_error_string())  # type: ignore[attr-defined]
        self.errors.extend(f"{k}: {v!r}" for k, v in error.trailing_metadata() or ())  # type: ignore[attr-defined]
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        if status is not None:
            self.errors.append(text_format.MessageToString(status))
            for detail in status.details:
                self.errors.append(detail.value.decode("utf-8", "replace"))
        return error


class _RecordingReceiver(OtlpReceiver):
    """The OTLP receiver, keeping every export whole: span events, status messages, links and
    resource attributes too, not only what OtlpReceiver reads."""

    def __init__(self, collected: Collected) -> None:
        super().__init__()
        self._collected = collected

    def Export(self, request, context):
        self._collected.spans.append(text_format.MessageToString(request, as_utf8=True))
        return super().Export(request, context)

    def export_metrics(self, request) -> None:
        self._collected.metrics.append(text_format.MessageToString(request, as_utf8=True))
        super().export_metrics(request)


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A role with a password of its own and a schema it owns; a URL that carries the password."""
    role, schema = f"secrets_{RUN}", f"test_{uuid.uuid4().hex[:16]}"
    with admin_connection() as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(DATABASE_PASSWORD)
            )
        )
        admin.execute(
            sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(schema), sql.Identifier(role))
        )
    try:
        yield f"postgresql://{role}:{DATABASE_PASSWORD}@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
    finally:
        with admin_connection() as admin:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


class _EchoingProvider(BaseHTTPRequestHandler):
    """A provider whose credential checks pass (the renderers' probes: Runway's organization,
    Replicate's account, a Vertex operation that does not exist), and that then refuses every render
    with 401, quoting the credential it was sent in a body each provider client reads its message from."""

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if status == 401:
            credential = self.headers.get("Authorization", "")
            self.send_header("WWW-Authenticate", f'Bearer error="invalid_token", token="{credential}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.endswith("/v1/organization"):
            models = {"gen4.5": {"maxConcurrentGenerations": 4, "maxDailyGenerations": 1000}}
            organization = {
                "creditBalance": 100_000,
                "tier": {"maxMonthlyCreditSpend": 1_000_000, "models": models},
            }
            self._answer(200, {**organization, "usage": {"models": {"gen4.5": {"dailyGenerations": 0}}}})
        elif self.path.endswith("/v1/account"):
            self._answer(
                200, {"type": "organization", "username": "echo", "name": "Echo", "github_url": None}
            )
        elif self.path.endswith(":fetchPredictOperation"):
            not_found = {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND"}
            self._answer(404, {"error": not_found})
        else:
            message = f"invalid credentials: {self.headers.get('Authorization', '')!r}"
            refusal = {"code": 401, "message": message, "status": "UNAUTHENTICATED"}
            self._answer(
                401, {"error": refusal, "detail": message, "title": "Unauthenticated", "status": 401}
            )

    do_GET = do_POST = do_DELETE = _handle

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def echoing_provider() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingProvider)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def gateway(mesh: Mesh, key: str) -> gateway_pb2_grpc.GatewayServiceStub:
    return gateway_pb2_grpc.GatewayServiceStub(
        with_api_key(grpc.insecure_channel(mesh.address("gateway")), key)
    )


def admin(mesh: Mesh, key: str = ADMIN_KEY) -> admin_pb2_grpc.AdminServiceStub:
    return admin_pb2_grpc.AdminServiceStub(with_api_key(grpc.insecure_channel(mesh.address("gateway")), key))


def spec(prompt: str, backend: int, seconds: float = 4, **fields: Any) -> render_pb2.RenderSpec:
    constraints = render_pb2.RenderConstraints(preferred_backend=backend)
    return render_pb2.RenderSpec(prompt=prompt, duration_seconds=seconds, constraints=constraints, **fields)


def drive(mesh: Mesh, collected: Collected) -> None:
    """Everything a careless service could print a secret over."""
    dev_key = mesh.api_key  # the development tenant, made with the admin key
    collected.secrets["development API key"] = dev_key
    stub = gateway(mesh, dev_key)

    def render(the_spec: render_pb2.RenderSpec) -> gateway_pb2.RenderJob:
        job = stub.CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=the_spec), timeout=30).job
        collected.job_ids.append(job.job_id)
        done = wait_terminal(stub, job.job_id)
        collected.answers.append(text_format.MessageToString(done, as_utf8=True))
        events = gateway_pb2.WatchRenderJobRequest(job_id=job.job_id)
        for message in stub.WatchRenderJob(events, timeout=30):
            collected.answers.append(text_format.MessageToString(message, as_utf8=True))
        return done

    # Renders that succeed through each provider.
    succeeded = {}
    for name, backend, seconds in (
        ("runway", backend_pb2.BACKEND_RUNWAY, 4),
        ("veo", backend_pb2.BACKEND_VEO, 4),
        ("replicate", backend_pb2.BACKEND_REPLICATE, 6),
    ):
        done = render(spec(f"A {name} secrets test: a heron in the reeds", backend, seconds))
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED, (name, done.error)
        assert done.backend == backend, (name, done.backend)
        succeeded[name] = done
    # Replicate's output URL does not change: the one the renderer downloaded, read as it read it.
    prediction = httpx.get(
        f"http://{mesh.address('sandbox')}/replicate/v1/predictions/{succeeded['replicate'].handle.task_id}",
        headers={"Authorization": f"Bearer {REPLICATE_TOKEN}"},
        timeout=10,
    ).json()
    output = prediction["output"] if isinstance(prediction["output"], str) else prediction["output"][0]
    collected.secrets["Replicate output URL token"] = OUTPUT_TOKEN.search(output).group(1)

    # A render that fails at every provider it is tried on.
    failed = render(spec("A storm at sea [sandbox:fail]", backend_pb2.BACKEND_RUNWAY))
    assert failed.state == job_pb2.JOB_STATE_FAILED
    # Runway refuses the key once (a 401 at create): the router falls back elsewhere.
    sandbox = Sandbox(mesh.address("sandbox"))
    sandbox.fault("runway", "create", "401", times=1)
    render(spec("A kite refused for its key", backend_pb2.BACKEND_RUNWAY))

    # Admin calls: a tenant, two keys, one revoked; a tenant with a budget of one micro-dollar.
    operator = admin(mesh)
    operator.CreateTenant(
        admin_pb2.CreateTenantRequest(tenant_id="acme", tier=admin_pb2.SLA_TIER_GOLD), timeout=30
    )
    kept = operator.CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant_id="acme", name="kept"), timeout=30)
    revoked = operator.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant_id="acme", name="revoked"), timeout=30
    )
    collected.secrets["acme API key"] = kept.secret
    collected.secrets["revoked API key"] = revoked.secret
    operator.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=revoked.key.key_id), timeout=30)
    listed = operator.ListApiKeys(admin_pb2.ListApiKeysRequest(tenant_id="acme"), timeout=30)
    collected.answers.append(text_format.MessageToString(listed, as_utf8=True))
    poor = mesh.create_api_key("poor", admin_pb2.SLA_TIER_GOLD, "poor", daily_budget_micros=1)
    collected.secrets["poor tenant's API key"] = poor

    # The kept key works; the revoked one, a near miss of a real key and a made-up one do not.
    acme = gateway(mesh, kept.secret)
    acme.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(), timeout=30)
    near_miss = dev_key[:-4] + ("AAAA" if not dev_key.endswith("AAAA") else "BBBB")
    made_up = f"aiprod_{secrets.token_hex(6)}_{RUN}{secrets.token_urlsafe(24)}"
    collected.secrets["near miss of the development key"] = near_miss
    collected.secrets["made-up API key"] = made_up
    for wrong in (revoked.secret, near_miss, made_up, f"not-a-key-{RUN}-{secrets.token_hex(8)}"):
        collected.secrets.setdefault(f"wrong key {wrong[:12]}", wrong)
        collected.refused(
            lambda wrong=wrong: gateway(mesh, wrong).ListRenderJobs(
                gateway_pb2.ListRenderJobsRequest(), timeout=30
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    # A key sent under another scheme, and none at all.
    raw = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(mesh.address("gateway")))
    collected.refused(
        lambda: raw.ListRenderJobs(
            gateway_pb2.ListRenderJobsRequest(), metadata=(("authorization", f"Basic {dev_key}"),), timeout=30
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    collected.refused(
        lambda: raw.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(), timeout=30),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    # The admin service with a tenant's key and a near miss of the admin key.
    near_admin = ADMIN_KEY[:-3] + "zzz"
    collected.secrets["near miss of the admin key"] = near_admin
    for wrong in (dev_key, near_admin):
        collected.refused(
            lambda wrong=wrong: admin(mesh, wrong).ListTenants(admin_pb2.ListTenantsRequest(), timeout=30),
            grpc.StatusCode.UNAUTHENTICATED,
        )

    # Bad input: every field wrong at once, and a signed image URL on a host never fetched.
    collected.refused(
        lambda: stub.CreateRenderJob(
            gateway_pb2.CreateRenderJobRequest(spec=spec("", backend_pb2.BACKEND_RUNWAY, seconds=10_000)),
            timeout=30,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    signed_image = render_pb2.Image(
        uri=f"https://127.0.0.1/frame.png?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature={CLIENT_SIGNATURE}"
    )
    collected.refused(
        lambda: stub.CreateRenderJob(
            gateway_pb2.CreateRenderJobRequest(
                spec=spec("A frame from a signed URL", backend_pb2.BACKEND_RUNWAY, first_frame=signed_image)
            ),
            timeout=30,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    collected.refused(
        lambda: stub.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=f"job_{'0' * 32}"), timeout=30),
        grpc.StatusCode.NOT_FOUND,
    )

    # A budget refusal: the poor tenant's job cannot reserve its cost.
    poor_stub = gateway(mesh, poor)
    job = poor_stub.CreateRenderJob(
        gateway_pb2.CreateRenderJobRequest(spec=spec("A yacht", backend_pb2.BACKEND_RUNWAY)), timeout=30
    ).job
    collected.job_ids.append(job.job_id)
    refused = wait_terminal(poor_stub, job.job_id)
    collected.answers.append(text_format.MessageToString(refused, as_utf8=True))
    assert refused.error.reason == Reason.BUDGET_EXHAUSTED, refused.error


def drive_echoing_renderers(renderers: Mesh, collected: Collected) -> None:
    """Each provider renderer, pointed at a provider whose 401 quotes the credential it was sent."""
    for backend in ("runway", "veo", "replicate"):
        with health_watch(renderers, backend) as statuses:
            wait_for_status(statuses, SERVING)
        stub = renderer_pb2_grpc.RendererServiceStub(
            grpc.insecure_channel(renderers.address(f"renderer-{backend}"))
        )
        request = renderer_pb2.StartRenderRequest(
            idempotency_key=f"secrets-{backend}:1", shot=shot(seconds=6 if backend == "replicate" else 4)
        )
        # The create's 401 fails the render (its failure is what the caller reads), or the call.
        try:
            render = stub.StartRender(request, timeout=60).render
            renders = [render]
            if render.state not in RENDER_ENDED and render.handle.task_id:
                renders += follow(stub, render.handle.task_id, timeout=60)
            shown = [text_format.MessageToString(each, as_utf8=True) for each in renders]
            collected.answers.extend(shown)
        except grpc.RpcError as error:
            shown = [f"{error.code()} {error.details()}", error.debug_error_string()]  # type: ignore[attr-defined]
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            if status is not None:
                shown.append(text_format.MessageToString(status))
            collected.errors.extend(shown)
        collected.provider_refusals.append(f"{backend}: {' '.join(shown)}")


def start_up_failures(tmp_path: Path, collected: Collected, echo: str) -> None:
    """Services stopped at start-up by a bad setting beside a secret: what they print."""
    cases = {
        "gateway, database unreachable": (
            "aiprod_gateway",
            {
                "AIPROD_DATABASE_URL": f"postgresql://secrets_{RUN}:{DATABASE_PASSWORD}@127.0.0.1:1/test",
                "AIPROD_DATABASE_CONNECT_TIMEOUT_SECONDS": "1",
                "AIPROD_GATEWAY_ADMIN_KEY": ADMIN_KEY,
            },
        ),
        "gateway, a bad tier setting": (
            "aiprod_gateway",
            {"AIPROD_GATEWAY_ADMIN_KEY": ADMIN_KEY, "AIPROD_GATEWAY_TIERS": "{not json"},
        ),
        "runway, a bad poll interval": (
            "aiprod_renderers.runway",
            {
                "RUNWAYML_API_SECRET": RUNWAY_SECRET,
                "RUNWAYML_BASE_URL": echo,
                "AIPROD_RUNWAY_POLL_SECONDS": "soon",
            },
        ),
        "replicate, a bad input mapping": (
            "aiprod_renderers.replicate",
            {"REPLICATE_API_TOKEN": REPLICATE_TOKEN, "AIPROD_REPLICATE_INPUT_MAPPING": "{not json"},
        ),
        "veo, a bad audio flag": (
            "aiprod_renderers.veo",
            {"AIPROD_VEO_ACCESS_TOKEN": VEO_TOKEN, "AIPROD_VEO_GENERATE_AUDIO": "perhaps"},
        ),
    }
    running = {}
    for name, (module, environment) in cases.items():
        data_dir = tmp_path / re.sub(r"\W+", "-", name)
        env = {
            **os.environ,
            **environment,
            "AIPROD_DATA_DIR": str(data_dir),
            "AIPROD_LOG_FORMAT": "json",
            "AIPROD_LOG_LEVEL": "debug",
            "AIPROD_GATEWAY_PORT": "0",
            "AIPROD_ROUTER_TARGET": "127.0.0.1:1",
            "AIPROD_METRICS_TARGET": "127.0.0.1:1",
        }
        # Side by side: each only starts and stops.
        running[name] = subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    for name, process in running.items():
        output, _ = process.communicate(timeout=60)
        assert process.returncode != 0, f"{name}: started anyway"
        lines = output.decode("utf-8", "replace").splitlines()
        assert lines, f"{name}: said nothing"
        collected.logs[f"start-up: {name}"] = lines


@pytest.fixture(scope="module")
def collected(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, echoing_provider: str
) -> Iterator[Collected]:
    result = Collected()
    result.secrets.update(
        {
            "Runway API secret": RUNWAY_SECRET,
            "Replicate API token": REPLICATE_TOKEN,
            "Vertex access token": VEO_TOKEN,
            "database password": DATABASE_PASSWORD,
            "admin key": ADMIN_KEY,
            "client's URL signature": CLIENT_SIGNATURE,
        }
    )
    data_dir = tmp_path_factory.mktemp("secrets")
    # Each service's log file holds its stdout as well as its stderr (aiprod_kit.mesh): a print() is
    # as much a leak as a log line.
    with _RecordingReceiver(result) as receiver:
        telemetry = {"AIPROD_OTEL_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        environment = {**ENVIRONMENT, **telemetry, "AIPROD_DATABASE_URL": database_url}
        mesh = Mesh(data_dir / "mesh", free_ports=True, sandbox=True, environment=environment)
        echoing = {
            **ENVIRONMENT,
            **telemetry,
            "RUNWAYML_BASE_URL": f"{echoing_provider}/runway",
            "REPLICATE_BASE_URL": f"{echoing_provider}/replicate",
            "AIPROD_VEO_BASE_URL": f"{echoing_provider}/vertex",
            "GOOGLE_CLOUD_PROJECT": "aiprod-secrets",
            "AIPROD_DATABASE_URL": database_url,
        }
        renderers = Mesh(
            data_dir / "echoing",
            free_ports=True,
            environment=echoing,
            only=("renderer-runway", "renderer-veo", "renderer-replicate"),
        )
        try:
            mesh.start()
            drive(mesh, result)
            renderers.start()
            drive_echoing_renderers(renderers, result)
        finally:
            # Stopped, every process has exported its last spans and points and written its last line.
            renderers.stop()
            mesh.stop()
        start_up_failures(data_dir / "start-up", result, echoing_provider)
    for path in sorted(data_dir.glob("*/logs/*.log")):
        result.logs[str(path.relative_to(data_dir))] = path.read_text(errors="replace").splitlines()
    yield result


def leaks(collected: Collected, texts: list[str]) -> list[str]:
    """Each secret (or derivative) found in the texts, with where."""
    found = []
    for name, secret in collected.secrets.items():
        # The raw value, as a URL or a Basic header would carry it, and an API key's secret part.
        derivatives = {secret, quote(secret, safe=""), base64.b64encode(secret.encode()).decode()}
        if secret.startswith("aiprod_"):
            derivatives.add(secret.split("_", 2)[2])  # the part after the public prefix
        for text in texts:
            for derivative in derivatives:
                if derivative in text:
                    found.append(
                        f"{name} in: {text[max(0, text.index(derivative) - 300) : text.index(derivative) + 100]}"
                    )
                    break
    for text in texts:
        if match := OUTPUT_TOKEN.search(text):
            found.append(f"a signed output URL in: {text[max(0, match.start() - 300) : match.end() + 50]}")
    return found


def test_the_collectors_collected_what_happened(collected):
    """Nothing found in nothing proves nothing: every collector holds the calls made."""
    assert len(collected.secrets) >= 14, sorted(collected.secrets)
    log_lines = [line for lines in collected.logs.values() for line in lines]
    assert {"mesh/logs/gateway.log", "mesh/logs/renderer-runway.log", "echoing/logs/renderer-veo.log"} <= set(
        collected.logs
    )
    assert sum(name.startswith("start-up:") for name in collected.logs) == 5
    spans, points, errors = (
        "\n".join(collected.spans),
        "\n".join(collected.metrics),
        "\n".join(collected.errors),
    )
    # What was collected, for whoever reads the run (pytest -s).
    print(
        f"\nsecrets: {len(collected.secrets)}; log lines: {len(log_lines)} from {len(collected.logs)} sources; "
        f"span exports: {len(collected.spans)} ({spans.count('span_id:')} spans); metric exports: "
        f"{len(collected.metrics)} ({points.count('attributes {')} attributes); client errors: "
        f"{len(collected.errors)} texts; answers: {len(collected.answers)}; jobs: {len(collected.job_ids)}"
    )
    for job_id in collected.job_ids:
        assert any(job_id in line for line in log_lines), f"no log line names {job_id}"
        assert job_id in spans, f"no span names {job_id}"
    assert len(collected.job_ids) == 6
    # The provider calls were traced with their URLs; the renderers' metrics were exported.
    assert "url.full" in spans or "http.url" in spans
    assert "aiprod.renderer.provider_requests" in points and "aiprod.gateway.jobs_completed" in points
    assert "aiprod.gateway.auth_failures" in points
    # The refusals were heard: wrong keys, bad fields, the echoing provider's 401 at each renderer.
    assert errors.count("UNAUTHENTICATED") >= 8
    assert "spec.prompt" in errors and "spec.first_frame.uri" in errors
    assert "BUDGET_EXHAUSTED" in "\n".join(collected.answers)
    # Each renderer reached the echoing provider and was refused for its credential, which its log,
    # its spans and its caller all heard of (redacted).
    assert len(collected.provider_refusals) == 3
    for refusal in collected.provider_refusals:
        assert "401" in refusal or "AUTH" in refusal.upper(), refusal
    for backend in ("runway", "veo", "replicate"):
        log = "\n".join(collected.logs[f"echoing/logs/renderer-{backend}.log"])
        assert f"Bearer {REDACTED}" in log, f"renderer-{backend} never logged the provider's refusal"
    assert spans.count(f"Bearer {REDACTED}") >= 3
    assert f"Bearer {REDACTED}" in "\n".join(collected.provider_refusals)


def test_no_secret_in_any_log_line(collected):
    lines = [f"{where}: {line}" for where, lines in collected.logs.items() for line in lines]
    assert not leaks(collected, lines), "\n\n".join(leaks(collected, lines))


def test_no_secret_in_any_span(collected):
    assert not leaks(collected, collected.spans), "\n\n".join(leaks(collected, collected.spans))


def test_no_secret_in_any_metric(collected):
    assert not leaks(collected, collected.metrics), "\n\n".join(leaks(collected, collected.metrics))


def test_no_secret_in_what_clients_are_shown(collected):
    shown = [*collected.errors, *collected.answers]
    assert not leaks(collected, shown), "\n\n".join(leaks(collected, shown))
