"""TLS and mutual TLS for every server and channel of the mesh (AIPROD_TLS_*), certificates reloaded
when their files change.

Plaintext is the local default. `tls`: each server presents its certificate, each client verifies it
against the CA file (the system's roots without one). `mtls`: each server also requires a client
certificate signed by the CA, and each client presents its own (the same files: one identity per
process, as cert-manager and a mounted Secret give it).

Rotation: a server reads its files again at the next handshake after they change (gRPC's dynamic
server credentials); a client's channel is replaced by a new one at its next call after they change,
the old one closed once its calls have had their grace. Connections already open keep their session.
"""

import asyncio
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
from pydantic_settings import BaseSettings, SettingsConfigDict

# How often a client looks at its certificate files (at most once per this many seconds, on a call).
RELOAD_CHECK_SECONDS = 5.0
# How long the calls of a channel replaced after a rotation may run on before it closes.
_OLD_CHANNEL_GRACE_SECONDS = 60.0

TlsMode = Literal["off", "tls", "mtls"]


class TlsSettings(BaseSettings):
    """A process's TLS settings (AIPROD_TLS_*): every service's, and the CLI's and supervisor's as
    clients of the mesh."""

    model_config = SettingsConfigDict(env_prefix="AIPROD_TLS_", extra="ignore", frozen=True)

    mode: TlsMode = "off"
    # The mode of this process's own server when it differs from its channels': the gateway's many
    # callers prove who they are with API keys, so its port may ask for TLS alone while the services it
    # calls require mutual TLS. Unset: the mode.
    server_mode: TlsMode | None = None
    # PEM files: this process's certificate chain and private key (a server's; a client's under mtls),
    # and the CA that signs the peers' certificates (clients: the system's roots when unset).
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    # The name clients check the servers' certificates against instead of the target's host (targets
    # given as IP addresses, or one certificate named for the whole mesh).
    server_name: str = ""

    @property
    def enabled(self) -> bool:
        """Whether channels use TLS."""
        return self.mode != "off"

    @property
    def serving_mode(self) -> TlsMode:
        return self.server_mode or self.mode

    def problems(self, server: bool) -> list[str]:
        """What is missing or unreadable for a service (a server that also calls others) or a client
        alone, each naming its variable."""
        # A client presents its certificate, and checks the server's against the CA, under mtls only
        # (under tls, the system's roots serve without a CA file); a server presents its certificate
        # under tls and mtls, and checks its callers' against the CA under mtls.
        required: dict[str, str] = {}  # file → the setting that needs it
        if self.mode == "mtls":
            required.update(dict.fromkeys(("CERT", "KEY", "CA"), "AIPROD_TLS_MODE=mtls"))
        if server and self.serving_mode != "off":
            setting = (
                f"{'AIPROD_TLS_SERVER_MODE' if self.server_mode else 'AIPROD_TLS_MODE'}={self.serving_mode}"
            )
            for name in ("CERT", "KEY", "CA") if self.serving_mode == "mtls" else ("CERT", "KEY"):
                required.setdefault(name, setting)
        problems = []
        for name, path in {"CERT": self.cert_file, "KEY": self.key_file, "CA": self.ca_file}.items():
            variable = f"AIPROD_TLS_{name}_FILE"
            if path is None:
                if name in required:
                    problems.append(f"{variable} is required with {required[name]}")
            elif not os.access(path, os.R_OK):
                problems.append(f"{variable}: {path} is not a readable file")
        return problems

    @classmethod
    def overridden(cls, environment: Mapping[str, str]) -> "TlsSettings":
        """The settings of a child process started with these variables over this one's own."""
        prefix = "AIPROD_TLS_"
        return cls(
            **{k.removeprefix(prefix).lower(): v for k, v in environment.items() if k.startswith(prefix)}
        )


@dataclass(frozen=True)
class _Material:
    """The PEM contents of the files, read together."""

    certificate: bytes | None
    key: bytes | None
    ca: bytes | None


class CertificateFiles:
    """The TLS files, read again only when one of them changed (its size or modification time)."""

    def __init__(self, tls: TlsSettings) -> None:
        self._paths = [p for p in (tls.cert_file, tls.key_file, tls.ca_file) if p is not None]
        self._tls = tls
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.material = self._read()

    def _stat(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in self._paths:
            try:
                status = path.stat()
            except OSError:
                stamps.append((-1, -1))
            else:
                stamps.append((status.st_mtime_ns, status.st_size))
        return tuple(stamps)

    def _read(self) -> _Material:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return _Material(read(self._tls.cert_file), read(self._tls.key_file), read(self._tls.ca_file))

    def refresh(self) -> bool:
        """Reads the files again if they changed since the last read; whether they did. A rotation
        caught half-written (unreadable, or a key without its certificate) keeps the last material and
        is read again next time."""
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp:
                return False
            try:
                material = self._read()
            except OSError:
                return False
            if (material.certificate is None) != (material.key is None):
                return False
            self._stamp, self.material = stamp, material
            return True


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """A server's credentials (None: plaintext), read from the files again after they change."""
    if tls.serving_mode == "off":
        return None
    files = CertificateFiles(tls)

    def certificate_configuration(material: _Material) -> grpc.ServerCertificateConfiguration:
        assert material.certificate is not None and material.key is not None
        return grpc.ssl_server_certificate_configuration(
            [(material.key, material.certificate)], root_certificates=material.ca
        )

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC at every handshake, from its own threads; None keeps the current configuration.
        return certificate_configuration(files.material) if files.refresh() else None

    return grpc.dynamic_ssl_server_credentials(
        certificate_configuration(files.material),
        fetch,
        require_client_authentication=tls.serving_mode == "mtls",
    )


def _channel_credentials(material: _Material, tls: TlsSettings) -> grpc.ChannelCredentials:
    mutual = tls.mode == "mtls"
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca,
        private_key=material.key if mutual else None,
        certificate_chain=material.certificate if mutual else None,
    )


def channel_options(tls: TlsSettings) -> list[tuple[str, Any]]:
    return [("grpc.ssl_target_name_override", tls.server_name)] if tls.enabled and tls.server_name else []


def dial(target: str, tls: TlsSettings, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A blocking channel (the CLI, the supervisor's health checks), with TLS as configured."""
    options = [*(options or []), *channel_options(tls)]
    if not tls.enabled:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, _channel_credentials(CertificateFiles(tls).material, tls), options)


def dial_aio(
    target: str,
    tls: TlsSettings,
    options: list[tuple[str, Any]] | None = None,
    interceptors: list[Any] | None = None,
    check_seconds: float = RELOAD_CHECK_SECONDS,
) -> grpc.aio.Channel:
    """An asyncio channel with TLS as configured; with TLS, one that follows certificate rotations."""
    options = [*(options or []), *channel_options(tls)]
    if not tls.enabled:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    files = CertificateFiles(tls)

    def open_secure() -> grpc.aio.Channel:
        credentials = _channel_credentials(files.material, tls)
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)

    return RotatingChannel(open_secure, files, check_seconds)


class RotatingChannel(grpc.aio.Channel):
    """An asyncio channel that replaces its underlying channel when its certificate files change.

    Stubs keep the multicallables they made at construction: each one here asks, at every call, for
    the current channel's own (made once per channel)."""

    def __init__(
        self,
        open_channel: Callable[[], grpc.aio.Channel],
        files: CertificateFiles,
        check_seconds: float = RELOAD_CHECK_SECONDS,
    ) -> None:
        self._open = open_channel
        self._files = files
        self._check_seconds = check_seconds
        self._checked = time.monotonic()
        self._channel = open_channel()
        self._generation = 0
        self._retired: set[asyncio.Task[None]] = set()

    def current(self) -> tuple[int, grpc.aio.Channel]:
        now = time.monotonic()
        if now - self._checked >= self._check_seconds:
            self._checked = now
            if self._files.refresh():
                old, self._channel = self._channel, self._open()
                self._generation += 1
                task = asyncio.get_running_loop().create_task(old.close(_OLD_CHANNEL_GRACE_SECONDS))
                self._retired.add(task)
                task.add_done_callback(self._retired.discard)
        return self._generation, self._channel

    def _multicallable(self, kind: str, *args: Any, **kwargs: Any) -> "_RotatingMultiCallable":
        return _RotatingMultiCallable(self, lambda channel: getattr(channel, kind)(*args, **kwargs))

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("unary_unary", *args, **kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("unary_stream", *args, **kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("stream_unary", *args, **kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("stream_stream", *args, **kwargs)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)
        for task in list(self._retired):
            task.cancel()

    async def __aenter__(self) -> "RotatingChannel":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current()[1].get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.current()[1].wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current()[1].channel_ready()


class _RotatingMultiCallable:
    def __init__(self, channel: RotatingChannel, make: Callable[[grpc.aio.Channel], Any]) -> None:
        self._channel = channel
        self._make = make
        self._made: tuple[int, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        generation, channel = self._channel.current()
        if self._made is None or self._made[0] != generation:
            self._made = (generation, self._make(channel))
        return self._made[1](*args, **kwargs)
