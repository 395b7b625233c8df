"""Mutual TLS across the mesh, as a developer runs it: `aiprod up --tls` makes development certificates
and starts every service serving and calling with mutual TLS; callers connect with what it prints.

Asserted: a render goes end to end (gateway, router, metrics and renderer all speaking mutual TLS to
each other) for a caller with the client certificate, through the generated stubs, the CLI and
grpcurl; a caller without a certificate, with one from another CA, or in plaintext is refused by every
service, which keeps serving; a certificate rotated on disk is what the next connection is shown; a
service told to run TLS without its files refuses to start, naming the setting.
"""

import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.cli import AIPROD, aiprod_up, cli_environment, gateway_address
from helpers.mesh import wait_terminal
from test_grpcurl import GRPCURL

from aiprod.common.v1 import job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.certificates import DevelopmentCertificates, development_certificates, issue
from aiprod_kit.mesh import Mesh, ServiceStartError
from aiprod_kit.tls import TlsSettings, dial

GRPC_SERVICES = ("gateway", "router", "metrics", "renderer-local")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`aiprod up --tls`: what it printed, with the certificates it made."""
    root = tmp_path_factory.mktemp("tls")
    with aiprod_up(root, "--tls") as (_, info):
        info["certificates"] = DevelopmentCertificates(root / "data" / "tls")
        yield info


def address(up: dict[str, Any], name: str) -> str:
    return next(service["address"] for service in up["services"] if service["name"] == name)


def client_tls(up: dict[str, Any]) -> TlsSettings:
    """A caller set up as `aiprod up --tls` says."""
    return TlsSettings.overridden(up["tls"])


def gateway(up: dict[str, Any], tls: TlsSettings) -> gateway_pb2_grpc.GatewayServiceStub:
    return gateway_pb2_grpc.GatewayServiceStub(with_api_key(dial(gateway_address(up), tls), up["api_key"]))


def health(up: dict[str, Any], name: str, tls: TlsSettings) -> int:
    with dial(address(up, name), tls) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def refusal(call: Any, *args: Any, **kwargs: Any) -> grpc.StatusCode:
    """The status code call(*args, **kwargs) fails with."""
    with pytest.raises(grpc.RpcError) as refused:
        call(*args, **kwargs)
    return refused.value.code()


def test_up_prints_what_a_caller_needs(up):
    certificates = up["certificates"]
    assert up["tls"] == {
        "AIPROD_TLS_MODE": "mtls",
        "AIPROD_TLS_CERT_FILE": str(certificates.client_cert),
        "AIPROD_TLS_KEY_FILE": str(certificates.client_key),
        "AIPROD_TLS_CA_FILE": str(certificates.ca),
    }
    assert all(Path(path).is_file() for variable, path in up["tls"].items() if variable.endswith("_FILE"))


def test_a_render_goes_end_to_end_over_mutual_tls(up):
    stub = gateway(up, client_tls(up))
    request = gateway_pb2.CreateRenderJobRequest(
        request_id="tls-end-to-end",
        spec=render_pb2.RenderSpec(prompt="A fox under the aurora", duration_seconds=2),
    )
    job = stub.CreateRenderJob(request, timeout=30).job
    finished = wait_terminal(stub, job.job_id)
    assert finished.state == job_pb2.JOB_STATE_SUCCEEDED, finished.error
    assert finished.result.video.uri and finished.result.video.size_bytes > 0


def test_callers_without_a_certificate_of_the_ca_are_refused_by_every_service(up, tmp_path):
    stranger = development_certificates(tmp_path / "another-ca")
    callers = {
        "plaintext": TlsSettings(),
        "server-verified TLS without a client certificate": TlsSettings(
            mode="tls", ca_file=up["certificates"].ca
        ),
        "a client certificate of another CA": TlsSettings.overridden(
            {**stranger.client_environment(), "AIPROD_TLS_CA_FILE": str(up["certificates"].ca)}
        ),
    }
    for name in GRPC_SERVICES:
        for caller, tls in callers.items():
            code = refusal(health, up, name, tls)
            assert code == grpc.StatusCode.UNAVAILABLE, (name, caller, code)
    # The gateway's own API is refused the same way, before any key is looked at.
    for caller, tls in callers.items():
        code = refusal(gateway(up, tls).ListRenderJobs, gateway_pb2.ListRenderJobsRequest(), timeout=10)
        assert code == grpc.StatusCode.UNAVAILABLE, caller
    # And every service still serves the callers it should.
    for name in GRPC_SERVICES:
        assert health(up, name, client_tls(up)) == health_pb2.HealthCheckResponse.SERVING, name


def cli(up: dict[str, Any], *args: str, **overrides: str | None) -> subprocess.CompletedProcess[str]:
    """`aiprod ARGS` against the gateway, with the settings `aiprod up --tls` printed (some overridden,
    None removing one)."""
    environment = {**cli_environment(up["api_key"]), "AIPROD_GATEWAY": gateway_address(up), **up["tls"]}
    for variable, value in overrides.items():
        environment.pop(variable, None)
        if value is not None:
            environment[variable] = value
    return subprocess.run(
        [str(AIPROD), *args], capture_output=True, text=True, timeout=180, env=environment, check=False
    )


def test_the_cli_renders_with_the_settings_up_printed(up):
    rendered = cli(up, "render", "A heron at dawn", "--duration", "2", "--json")
    assert rendered.returncode == 0, rendered.stderr
    assert json.loads(rendered.stdout)["state"] == "JOB_STATE_SUCCEEDED"
    # Without them, it cannot reach the gateway, and says where it tried.
    refused = cli(up, "jobs", "list", **dict.fromkeys(up["tls"]))
    assert refused.returncode != 0
    assert gateway_address(up) in refused.stderr


def test_the_cli_names_a_tls_file_it_cannot_read(up, tmp_path):
    missing = tmp_path / "missing.pem"
    result = cli(up, "jobs", "list", AIPROD_TLS_CA_FILE=str(missing))
    assert result.returncode == 2
    assert f"AIPROD_TLS_CA_FILE: {missing} is not a readable file" in result.stderr


def grpcurl(up: dict[str, Any], *args: str, certificate: bool = True) -> subprocess.CompletedProcess[str]:
    certificates = up["certificates"]
    flags = ["-cacert", str(certificates.ca)]
    if certificate:
        flags += ["-cert", str(certificates.client_cert), "-key", str(certificates.client_key)]
    return subprocess.run([GRPCURL, *flags, *args], capture_output=True, text=True, timeout=60, check=False)


def test_grpcurl_reaches_the_gateway_over_mutual_tls(up):
    listed = grpcurl(up, gateway_address(up), "list")
    assert listed.returncode == 0, listed.stderr
    assert "aiprod.gateway.v1.GatewayService" in listed.stdout.split()
    request = json.dumps({"request_id": "tls-grpcurl", "spec": {"prompt": "A kite", "duration_seconds": 1}})
    created = grpcurl(
        up,
        "-H",
        f"authorization: Bearer {up['api_key']}",
        "-d",
        request,
        gateway_address(up),
        "aiprod.gateway.v1.GatewayService/CreateRenderJob",
    )
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["job"]["job_id"].startswith("job_")
    # Without its certificate, grpcurl is refused at the handshake.
    refused = grpcurl(up, gateway_address(up), "list", certificate=False)
    assert refused.returncode != 0


def served_certificate(up: dict[str, Any], name: str) -> x509.Certificate:
    """The certificate a new connection to the service is shown (a plain TLS handshake, h2 offered)."""
    certificates = up["certificates"]
    context = ssl.create_default_context(cafile=str(certificates.ca))
    context.load_cert_chain(certificates.client_cert, certificates.client_key)
    context.set_alpn_protocols(["h2"])
    host, port = address(up, name).rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_rotated_certificate_is_served_at_the_next_connection(up):
    certificates = up["certificates"]
    before = served_certificate(up, "gateway")
    issue(
        certificates,
        certificates.mesh_cert,
        certificates.mesh_key,
        "aiprod-mesh-rotated",
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        ("localhost",),
        tuple(f"127.0.0.{host}" for host in range(1, 9)),
    )
    after = served_certificate(up, "gateway")
    assert after.serial_number != before.serial_number
    assert after.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "aiprod-mesh-rotated"
    # The mesh goes on serving with its new certificate, its services calling each other with it.
    stub = gateway(up, client_tls(up))
    request = gateway_pb2.CreateRenderJobRequest(
        request_id="tls-rotated", spec=render_pb2.RenderSpec(prompt="A lantern", duration_seconds=1)
    )
    finished = wait_terminal(stub, stub.CreateRenderJob(request, timeout=30).job.job_id)
    assert finished.state == job_pb2.JOB_STATE_SUCCEEDED, finished.error


def test_a_service_told_to_use_tls_without_its_files_refuses_to_start_naming_them(tmp_path):
    mesh = Mesh(
        tmp_path,
        free_ports=True,
        only=("metrics",),
        environment={"AIPROD_TLS_MODE": "mtls"},
        start_timeout=30,
    )
    with pytest.raises(ServiceStartError) as refused:
        mesh.start()
    for variable in ("AIPROD_TLS_CERT_FILE", "AIPROD_TLS_KEY_FILE", "AIPROD_TLS_CA_FILE"):
        assert f"{variable} is required with AIPROD_TLS_MODE=mtls" in str(refused.value)


def test_the_health_port_answers_probes_in_plaintext_and_serves_nothing_else(up, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    environment = {**up["certificates"].environment(), "AIPROD_HEALTH_PORT": str(free)}
    mesh = Mesh(tmp_path, free_ports=True, only=("metrics",), environment=environment)
    mesh.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{free}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="aiprod.metrics.v1.MetricsService"), timeout=10
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            budget = channel.unary_unary("/aiprod.metrics.v1.MetricsService/GetBudget")
            assert refusal(budget, b"", timeout=10) == grpc.StatusCode.UNIMPLEMENTED
        # The service's own port still requires a certificate.
        assert refusal(health, up, "metrics", TlsSettings()) == grpc.StatusCode.UNAVAILABLE
        with dial(mesh.address("metrics"), client_tls(up)) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        mesh.stop()
