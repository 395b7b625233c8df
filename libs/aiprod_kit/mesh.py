"""Starts the mesh's services as child processes and stops them: used by `aiprod up` and the tests.

Each service is started with its port (0 for a free one), its logs go to a file under the data
directory, and the supervisor reads the bound port from the service's "serving" log line, then
confirms SERVING through the standard health service.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiprod.gateway.v1 import admin_pb2, admin_pb2_grpc
from aiprod_kit import settings as defaults
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.tls import TlsSettings, dial


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    port_variable: str
    default_port: int
    # The gRPC health service name; None for the sandbox, an HTTP service checked at /_sandbox/health.
    health_name: str | None


_RENDERER = "aiprod.renderer.v1.RendererService"
# In start order: every service starts after the ones it calls.
SERVICES = (
    ServiceSpec("metrics", "aiprod_metrics", "AIPROD_METRICS_PORT", defaults.METRICS_PORT,
                "aiprod.metrics.v1.MetricsService"),
    ServiceSpec("sandbox", "aiprod_sandbox", "AIPROD_SANDBOX_PORT", defaults.SANDBOX_PORT, None),
    ServiceSpec("renderer-local", "aiprod_renderers.local", "AIPROD_LOCAL_RENDERER_PORT",
                defaults.LOCAL_RENDERER_PORT, _RENDERER),
    ServiceSpec("renderer-runway", "aiprod_renderers.runway", "AIPROD_RUNWAY_PORT",
                defaults.RUNWAY_RENDERER_PORT, _RENDERER),
    ServiceSpec("renderer-veo", "aiprod_renderers.veo", "AIPROD_VEO_PORT", defaults.VEO_RENDERER_PORT, _RENDERER),
    ServiceSpec("renderer-replicate", "aiprod_renderers.replicate", "AIPROD_REPLICATE_PORT",
                defaults.REPLICATE_RENDERER_PORT, _RENDERER),
    ServiceSpec("router", "aiprod_router", "AIPROD_ROUTER_PORT", defaults.ROUTER_PORT,
                "aiprod.router.v1.RouterService"),
    ServiceSpec("gateway", "aiprod_gateway", "AIPROD_GATEWAY_PORT", defaults.GATEWAY_PORT,
                "aiprod.gateway.v1.GatewayService"),
)  # fmt: skip
PROVIDER_BACKENDS = ("runway", "veo", "replicate")
# The key the sandbox accepts; renderers pointed at it use it as their credentials.
SANDBOX_API_KEY = "sandbox-key"
# The tenant `aiprod up` and the tests order videos as.
DEVELOPMENT_TENANT = "dev"


def sandbox_environment(address: str) -> dict[str, str]:
    """Points the provider renderers (their official clients) at the sandbox, with its credentials."""
    root = f"http://{address}"
    return {
        "RUNWAYML_BASE_URL": f"{root}/runway",
        "RUNWAYML_API_SECRET": SANDBOX_API_KEY,
        "REPLICATE_BASE_URL": f"{root}/replicate",
        "REPLICATE_API_TOKEN": SANDBOX_API_KEY,
        "AIPROD_VEO_BASE_URL": f"{root}/vertex",
        "AIPROD_VEO_ACCESS_TOKEN": SANDBOX_API_KEY,
        "GOOGLE_CLOUD_PROJECT": "aiprod-sandbox",
    }


class ServiceStartError(RuntimeError):
    pass


@dataclass
class RunningService:
    spec: ServiceSpec
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    host: str = "127.0.0.1"
    log_pump: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log_text(self) -> str:
        """The service's log so far; once the process has ended, all of it."""
        if self.process.poll() is not None:
            self.await_log_end()
        return self.log_path.read_text(errors="replace")

    def await_log_end(self, timeout: float = 5.0) -> None:
        """Waits for the pump thread to copy the ended process's last lines to the log file."""
        if self.log_pump is not None:
            self.log_pump.join(timeout)


@dataclass
class Mesh:
    """The mesh's processes. Ports default to the documented ones; free_ports=True picks free ones.

    `backends` names the renderers to run (local always makes sense; runway, veo and replicate need
    credentials, or `sandbox=True`, which starts the provider sandbox and points them at it).
    `only` starts just the named services (a test of one renderer against the sandbox, say).
    """

    data_dir: Path
    free_ports: bool = False
    environment: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 60.0
    backends: tuple[str, ...] = ("local",)
    sandbox: bool = False
    only: tuple[str, ...] = ()
    services: dict[str, RunningService] = field(default_factory=dict)
    # The gateway's admin key (AIPROD_GATEWAY_ADMIN_KEY), fresh for each mesh unless environment sets it.
    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # API keys made for tenants (admin_api_key), by tenant id.
    api_keys: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.admin_key = self.environment.get("AIPROD_GATEWAY_ADMIN_KEY", self.admin_key)

    @property
    def api_key(self) -> str:
        """The development tenant's API key (the tenant and the key made on first use)."""
        if DEVELOPMENT_TENANT not in self.api_keys:
            self.api_keys[DEVELOPMENT_TENANT] = self.create_api_key(
                DEVELOPMENT_TENANT, admin_pb2.SLA_TIER_GOLD, "development", display_name="Development"
            )
        return self.api_keys[DEVELOPMENT_TENANT]

    @property
    def tls(self) -> TlsSettings:
        """The TLS the services run with, as their clients need it (AIPROD_TLS_* in environment)."""
        return TlsSettings.overridden(self.environment)

    def dial(self, name: str) -> grpc.Channel:
        """A new blocking channel to a service, with the mesh's TLS."""
        return dial(self.address(name), self.tls)

    def admin(self, gateway: str = "gateway") -> admin_pb2_grpc.AdminServiceStub:
        """An AdminService stub of the gateway, each call with the admin key."""
        channel = with_api_key(self.dial(gateway), self.admin_key)
        return admin_pb2_grpc.AdminServiceStub(channel)

    def create_api_key(
        self,
        tenant_id: str,
        tier: int = admin_pb2.SLA_TIER_GOLD,
        name: str = "",
        display_name: str = "",
        daily_budget_micros: int | None = None,
    ) -> str:
        """A new API key of the tenant, creating the tenant first if it does not exist."""
        admin = self.admin()
        request = admin_pb2.CreateTenantRequest(tenant_id=tenant_id, tier=tier, display_name=display_name)
        if daily_budget_micros is not None:
            request.daily_budget.currency_code = "USD"
            request.daily_budget.amount_micros = daily_budget_micros
        try:
            admin.CreateTenant(request, timeout=30)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:  # type: ignore[attr-defined]
                raise
        created = admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id=tenant_id, name=name), timeout=30
        )
        return created.secret

    def wanted(self) -> list[ServiceSpec]:
        names = set(self.only) or {"metrics", "router", "gateway", *(f"renderer-{b}" for b in self.backends)}
        if self.sandbox and not self.only:
            names |= {"sandbox", *(f"renderer-{b}" for b in PROVIDER_BACKENDS)}
        return [spec for spec in SERVICES if spec.name in names]

    def start(self) -> None:
        try:
            for spec in self.wanted():
                self.start_service(spec.name)
        except BaseException:
            self.stop()
            raise

    def _service_environment(self, spec: ServiceSpec, port: int) -> dict[str, str]:
        """The child's environment: this process's, the wiring to the services already up, then the
        caller's overrides (which win), then what the supervisor itself depends on."""
        env = dict(os.environ)
        if "sandbox" in self.services:
            env.update(sandbox_environment(self.services["sandbox"].address))
        if "metrics" in self.services:
            env["AIPROD_METRICS_TARGET"] = self.services["metrics"].address
        replicas: dict[str, list[str]] = {}
        for name, service in self.services.items():
            if name.startswith("renderer-"):
                backend = name.removeprefix("renderer-").partition("@")[0]
                replicas.setdefault(backend, []).append(service.address)
        if replicas:
            # Several replicas of one renderer: an address list the router balances round-robin.
            env["AIPROD_RENDERERS"] = ",".join(
                f"{backend}={addresses[0] if len(addresses) == 1 else 'ipv4:' + ','.join(addresses)}"
                for backend, addresses in replicas.items()
            )
        if "router" in self.services:
            env["AIPROD_ROUTER_TARGET"] = self.services["router"].address
        env["AIPROD_GATEWAY_ADMIN_KEY"] = self.admin_key
        env.update(self.environment)
        env.update(AIPROD_DATA_DIR=str(self.data_dir), AIPROD_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
        env[spec.port_variable] = str(port)
        return env

    def start_replica(self, name: str, host: str) -> RunningService:
        """Starts another replica of a running service, on the same port at another loopback address
        (127.0.0.2, ...); it is known as NAME@HOST."""
        return self.start_service(name, self.services[name].port, host=host)

    def start_service(self, name: str, port: int | None = None, host: str = "127.0.0.1") -> RunningService:
        """Starts one service (again, after a kill: on the same port unless told otherwise)."""
        spec = next(spec for spec in SERVICES if spec.name == name)
        key = name if host == "127.0.0.1" else f"{name}@{host}"
        if port is None:
            previous = self.services.get(key)
            port = previous.port if previous else (0 if self.free_ports else spec.default_port)
        log_dir = self.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{key}.log"
        environment = self._service_environment(spec, port)
        if host != "127.0.0.1":
            environment["AIPROD_HOST"] = host
        process = subprocess.Popen(
            [sys.executable, "-m", spec.module],
            env=environment,
            stdin=subprocess.DEVNULL,
            # Both streams into the log: the logs go to stderr, but whatever a library prints belongs
            # there too (and is read by whoever checks the logs for secrets).
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches the supervisor alone, which then stops
            # the services in order.
            start_new_session=True,
        )
        try:
            bound, pump = _await_serving_port(process, log_path, self.start_timeout)
            if bound is None:
                if process.poll() is not None:
                    pump.join(timeout=10)  # its last words, which say why
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                raise ServiceStartError(f"{name} did not start; its log ({log_path}) ends with:\n{tail}")
            service = RunningService(spec, process, bound, log_path, host, pump)
            _check_serving(service, self.tls, self.start_timeout)
        except BaseException:
            process.kill()
            process.wait()
            raise
        self.services[key] = service
        return service

    def address(self, name: str) -> str:
        return self.services[name].address

    def stop_service(self, name: str, timeout: float = 20.0) -> None:
        """SIGTERM one service and wait for it; it can be started again with start_service."""
        process = self.services[name].process
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.services[name].await_log_end()  # stopped means its log is whole

    def kill(self, name: str) -> None:
        """SIGKILL: the service gets no chance to clean up."""
        process = self.services[name].process
        process.kill()
        process.wait()
        self.services[name].await_log_end()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM in reverse start order, so that callers drain before the services they call."""
        for name, service in reversed(list(self.services.items())):
            if service.process.poll() is None:
                self.stop_service(name, timeout)


def _await_serving_port(
    process: subprocess.Popen[bytes], log_path: Path, timeout: float
) -> tuple[int | None, threading.Thread]:
    """Copies the child's output to its log file (the thread returned) and returns the port of its
    "serving" line, or None if it ended or timed out first.

    The copy moves whatever the pipe holds at each read, not a line at a time: a service under load
    writes hundreds of lines a second, and a write and a flush per line in this process (the bench's
    client, the tests' runner) took the GIL from it, or let the pipe fill and stall the service."""
    found: dict[str, int] = {}
    serving = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        source = process.stdout.fileno()
        pending = b""  # an unfinished line, until the serving one is found
        with log_path.open("ab") as log_file:
            while chunk := os.read(source, _PUMP_BYTES):
                log_file.write(chunk)
                log_file.flush()
                if serving.is_set():
                    continue
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    port = _serving_port(line)
                    if port is not None:
                        found["port"] = port
                        serving.set()
                        break
        serving.set()  # the process ended: stop waiting

    thread = threading.Thread(target=pump, name=f"log-{log_path.stem}", daemon=True)
    thread.start()
    serving.wait(timeout)
    return found.get("port"), thread


# The most a log copy moves at once (the pipe's whole buffer by default on Linux).
_PUMP_BYTES = 1 << 16


def _serving_port(line: bytes) -> int | None:
    """The port of a service's "serving" log line; None for any other line."""
    if b'"serving"' not in line:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if isinstance(record, dict) and record.get("event") == "serving":
        return int(record["port"])
    return None


def _check_serving(service: RunningService, tls: TlsSettings, timeout: float) -> None:
    if service.spec.health_name is None:
        response = httpx.get(f"http://{service.address}/_sandbox/health", timeout=timeout)
        if response.status_code != 200:
            raise ServiceStartError(f"{service.spec.name} answers {response.status_code} on its health check")
        return
    with dial(service.address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        # The process-wide "" status: a renderer without credentials is up yet NOT_SERVING by name.
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise ServiceStartError(f"{service.spec.name} reports {response.status}")
