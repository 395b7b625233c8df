"""aiprod_kit.tls: certificates rotated on disk are used by the next handshake, on the server's side
(gRPC's dynamic server credentials) and on a client's (its channel replaced); the settings name what is
missing. Real gRPC servers in this process, files written as cert-manager rotates them."""

import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aiprod_kit.certificates import DevelopmentCertificates, development_certificates
from aiprod_kit.tls import CertificateFiles, RotatingChannel, TlsSettings, dial_aio, server_credentials


@pytest.fixture(scope="module")
def authorities(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[DevelopmentCertificates, DevelopmentCertificates]:
    """Two unrelated CAs, each with a mesh and a client certificate."""
    root = tmp_path_factory.mktemp("authorities")
    return development_certificates(root / "a"), development_certificates(root / "b")


def install(cert: Path, key: Path, directory: Path) -> TlsSettings:
    """Copies a certificate and its key to fixed paths in directory (replacing them whole, as a mounted
    Secret's update does), returning settings that point there."""
    directory.mkdir(exist_ok=True)
    for source, name in ((key, "tls.key"), (cert, "tls.crt")):
        shutil.copyfile(source, directory / f"{name}.new")
        (directory / f"{name}.new").replace(directory / name)
    return TlsSettings(cert_file=directory / "tls.crt", key_file=directory / "tls.key")


async def serve(credentials: grpc.ServerCredentials) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def check(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_a_server_presents_its_rotated_certificate_at_the_next_handshake(authorities, tmp_path):
    old, new = authorities
    files = install(old.mesh_cert, old.mesh_key, tmp_path / "server")
    server, address = await serve(server_credentials(files.model_copy(update={"mode": "tls"})))
    trusting_new = TlsSettings(mode="tls", ca_file=new.ca, server_name="localhost")
    try:
        async with dial_aio(address, trusting_new) as channel:
            assert await check(channel) == grpc.StatusCode.UNAVAILABLE
        install(new.mesh_cert, new.mesh_key, tmp_path / "server")
        async with dial_aio(address, trusting_new) as channel:
            assert await check(channel) == grpc.StatusCode.OK
    finally:
        await server.stop(None)


async def test_a_client_presents_its_rotated_certificate_on_its_next_call(authorities, tmp_path):
    old, new = authorities
    server_files = install(new.mesh_cert, new.mesh_key, tmp_path / "server")
    mutual = server_files.model_copy(update={"mode": "mtls", "ca_file": new.ca})
    server, address = await serve(server_credentials(mutual))
    client_files = install(old.client_cert, old.client_key, tmp_path / "client")
    client = client_files.model_copy(update={"mode": "mtls", "ca_file": new.ca, "server_name": "localhost"})
    channel = dial_aio(address, client, check_seconds=0)
    assert isinstance(channel, RotatingChannel)
    try:
        # The client's certificate is of a CA the server does not trust: refused at the handshake.
        assert await check(channel) == grpc.StatusCode.UNAVAILABLE
        install(new.client_cert, new.client_key, tmp_path / "client")
        # The same channel (and the stub made on it before) now connects with the new certificate.
        assert await check(channel) == grpc.StatusCode.OK
        assert await check(channel) == grpc.StatusCode.OK
    finally:
        await channel.close()
        await server.stop(None)


def test_a_rotation_caught_half_written_keeps_the_last_certificate(authorities, tmp_path):
    old, new = authorities
    files = install(old.client_cert, old.client_key, tmp_path / "client")
    reader = CertificateFiles(files)
    first = reader.material
    (tmp_path / "client" / "tls.crt").unlink()  # the certificate not yet written back
    assert not reader.refresh()
    assert reader.material == first
    install(new.client_cert, new.client_key, tmp_path / "client")
    assert reader.refresh()
    assert reader.material.certificate == new.client_cert.read_bytes()
    assert not reader.refresh()  # nothing changed since


def test_settings_name_what_a_server_or_a_client_is_missing(tmp_path):
    assert TlsSettings().problems(server=True) == []
    assert TlsSettings(mode="tls").problems(server=True) == [
        "AIPROD_TLS_CERT_FILE is required with AIPROD_TLS_MODE=tls",
        "AIPROD_TLS_KEY_FILE is required with AIPROD_TLS_MODE=tls",
    ]
    # A client of plain TLS needs nothing of its own (the system's roots verify the servers).
    assert TlsSettings(mode="tls").problems(server=False) == []
    assert TlsSettings(mode="mtls").problems(server=False) == [
        "AIPROD_TLS_CERT_FILE is required with AIPROD_TLS_MODE=mtls",
        "AIPROD_TLS_KEY_FILE is required with AIPROD_TLS_MODE=mtls",
        "AIPROD_TLS_CA_FILE is required with AIPROD_TLS_MODE=mtls",
    ]
    # The gateway's port under TLS alone, its channels under mutual TLS: the server's mode is named.
    assert TlsSettings(server_mode="tls").problems(server=True) == [
        "AIPROD_TLS_CERT_FILE is required with AIPROD_TLS_SERVER_MODE=tls",
        "AIPROD_TLS_KEY_FILE is required with AIPROD_TLS_SERVER_MODE=tls",
    ]
    assert TlsSettings(mode="mtls", server_mode="tls").problems(server=True)[-1] == (
        "AIPROD_TLS_CA_FILE is required with AIPROD_TLS_MODE=mtls"
    )
    missing = tmp_path / "ca.pem"
    assert TlsSettings(mode="tls", ca_file=missing).problems(server=False) == [
        f"AIPROD_TLS_CA_FILE: {missing} is not a readable file"
    ]


def test_settings_of_a_child_are_its_overrides_over_this_process(monkeypatch):
    monkeypatch.setenv("AIPROD_TLS_MODE", "tls")
    monkeypatch.setenv("AIPROD_TLS_SERVER_NAME", "gateway.aiprod")
    child = TlsSettings.overridden({"AIPROD_TLS_MODE": "mtls", "AIPROD_OTHER": "x"})
    assert (child.mode, child.server_name) == ("mtls", "gateway.aiprod")
