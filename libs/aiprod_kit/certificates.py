"""Development certificates: a private CA, the mesh's certificate and a caller's, for `aiprod up --tls`
and the tests (a cluster gets its own from cert-manager: k8s/components/tls).

Written as PEM files in one directory and kept there while still valid, so that a caller configured once
(grpcurl's flags, AIPROD_TLS_* in a shell) keeps working across restarts of the mesh.
"""

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The names the services answer to on one machine (replicas listen on 127.0.0.2, ...).
LOCAL_NAMES = ("localhost",)
LOCAL_ADDRESSES = tuple(f"127.0.0.{host}" for host in range(1, 9))
_VALIDITY = datetime.timedelta(days=90)
# Renewed when less than this is left, as cert-manager does at two thirds of a certificate's life.
_RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class DevelopmentCertificates:
    """Where the PEM files are: the CA, the mesh's certificate and key (its servers', and its clients'
    under mutual TLS), and a caller's certificate and key (the CLI, grpcurl)."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def mesh_cert(self) -> Path:
        return self.directory / "mesh.pem"

    @property
    def mesh_key(self) -> Path:
        return self.directory / "mesh.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    def environment(self, mode: str = "mtls") -> dict[str, str]:
        """The AIPROD_TLS_* of the mesh's services."""
        return {
            "AIPROD_TLS_MODE": mode,
            "AIPROD_TLS_CERT_FILE": str(self.mesh_cert),
            "AIPROD_TLS_KEY_FILE": str(self.mesh_key),
            "AIPROD_TLS_CA_FILE": str(self.ca),
        }

    def client_environment(self, mode: str = "mtls") -> dict[str, str]:
        """The AIPROD_TLS_* of a caller (the CLI): the caller's own certificate."""
        return {
            "AIPROD_TLS_MODE": mode,
            "AIPROD_TLS_CERT_FILE": str(self.client_cert),
            "AIPROD_TLS_KEY_FILE": str(self.client_key),
            "AIPROD_TLS_CA_FILE": str(self.ca),
        }


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # Written aside and renamed: a reader (a server at its next handshake) never sees half a file.
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_bytes(data)
    if private:
        partial.chmod(0o600)
    os.replace(partial, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _still_valid(path: Path) -> bool:
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    return certificate.not_valid_after_utc - _now() > _RENEW_BEFORE


def issue(
    certificates: DevelopmentCertificates,
    cert_path: Path,
    key_path: Path,
    common_name: str,
    usages: list[x509.ObjectIdentifier],
    names: tuple[str, ...] = (),
    addresses: tuple[str, ...] = (),
) -> None:
    """Issues a certificate signed by the CA into cert_path and key_path (also to rotate one)."""
    ca_key = serialization.load_pem_private_key(certificates.ca_key.read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(certificates.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if names or addresses:
        alternative = [x509.DNSName(name) for name in names]
        alternative += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative), critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, certificate.public_bytes(serialization.Encoding.PEM))


def development_certificates(directory: Path) -> DevelopmentCertificates:
    """The certificates in directory, made (or renewed) when missing or close to expiry."""
    certificates = DevelopmentCertificates(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not (_still_valid(certificates.ca) and certificates.ca_key.exists()):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AIPROD development CA")])
        now = _now()
        ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + 4 * _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        _write(certificates.ca_key, _key_pem(key), private=True)
        _write(certificates.ca, ca.public_bytes(serialization.Encoding.PEM))
        certificates.mesh_cert.unlink(missing_ok=True)
        certificates.client_cert.unlink(missing_ok=True)
    if not _still_valid(certificates.mesh_cert):
        issue(
            certificates,
            certificates.mesh_cert,
            certificates.mesh_key,
            "aiprod-mesh",
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            LOCAL_NAMES,
            LOCAL_ADDRESSES,
        )
    if not _still_valid(certificates.client_cert):
        issue(
            certificates,
            certificates.client_cert,
            certificates.client_key,
            "aiprod-client",
            [ExtendedKeyUsageOID.CLIENT_AUTH],
        )
    return certificates
