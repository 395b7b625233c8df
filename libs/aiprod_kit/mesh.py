"""Starts the mesh's services as child processes and stops them: used by `aiprod up` and the tests.

Each service is started with its port (0 for a free one), its logs go to a file under the data
directory, and the supervisor reads the bound port from the service's "serving" log line, then
confirms SERVING through the standard health service.
"""

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiprod_kit import settings as defaults


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    port_variable: str
    default_port: int
    health_name: str


# In start order: every service starts after the ones it calls.
SERVICES = (
    ServiceSpec("metrics", "aiprod_metrics", "AIPROD_METRICS_PORT", defaults.METRICS_PORT,
                "aiprod.metrics.v1.MetricsService"),
    ServiceSpec("renderer-local", "aiprod_renderers.local", "AIPROD_LOCAL_RENDERER_PORT",
                defaults.LOCAL_RENDERER_PORT, "aiprod.renderer.v1.RendererService"),
    ServiceSpec("router", "aiprod_router", "AIPROD_ROUTER_PORT", defaults.ROUTER_PORT,
                "aiprod.router.v1.RouterService"),
    ServiceSpec("gateway", "aiprod_gateway", "AIPROD_GATEWAY_PORT", defaults.GATEWAY_PORT,
                "aiprod.gateway.v1.GatewayService"),
)  # fmt: skip


class ServiceStartError(RuntimeError):
    pass


@dataclass
class RunningService:
    spec: ServiceSpec
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Mesh:
    """The mesh's processes. Ports default to the documented ones; pass free=True for free ports."""

    data_dir: Path
    free_ports: bool = False
    environment: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 60.0
    services: dict[str, RunningService] = field(default_factory=dict)

    def start(self) -> None:
        try:
            for spec in SERVICES:
                self.start_service(spec.name)
        except BaseException:
            self.stop()
            raise

    def _service_environment(self, spec: ServiceSpec, port: int) -> dict[str, str]:
        env = {**os.environ, **self.environment}
        env.update(
            AIPROD_DATA_DIR=str(self.data_dir),
            AIPROD_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
        )
        env[spec.port_variable] = str(port)
        if "metrics" in self.services:
            env["AIPROD_METRICS_TARGET"] = self.services["metrics"].address
        if "renderer-local" in self.services:
            env["AIPROD_RENDERERS"] = f"local={self.services['renderer-local'].address}"
        if "router" in self.services:
            env["AIPROD_ROUTER_TARGET"] = self.services["router"].address
        return env

    def start_service(self, name: str, port: int | None = None) -> RunningService:
        """Starts one service (again, after a kill: on the same port unless told otherwise)."""
        spec = next(spec for spec in SERVICES if spec.name == name)
        if port is None:
            previous = self.services.get(name)
            port = previous.port if previous else (0 if self.free_ports else spec.default_port)
        log_dir = self.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", spec.module],
            env=self._service_environment(spec, port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # Its own session: a Ctrl-C in the terminal reaches the supervisor alone, which then stops
            # the services in order.
            start_new_session=True,
        )
        try:
            bound = _await_serving_port(process, log_path, self.start_timeout)
            if bound is None:
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                raise ServiceStartError(f"{name} did not start; its log ({log_path}) ends with:\n{tail}")
            service = RunningService(spec, process, bound, log_path)
            _check_serving(service, self.start_timeout)
        except BaseException:
            process.kill()
            process.wait()
            raise
        self.services[name] = service
        return service

    def address(self, name: str) -> str:
        return self.services[name].address

    def kill(self, name: str) -> None:
        """SIGKILL: the service gets no chance to clean up."""
        process = self.services[name].process
        process.kill()
        process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM in reverse start order, so that callers drain before the services they call."""
        for name in reversed([spec.name for spec in SERVICES]):
            service = self.services.get(name)
            if service is None or service.process.poll() is not None:
                continue
            service.process.send_signal(signal.SIGTERM)
            try:
                service.process.wait(timeout)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()


def _await_serving_port(process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> int | None:
    """Copies the child's stderr to its log file and returns the port of its "serving" line."""
    found: dict[str, int] = {}
    serving = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        with log_path.open("ab") as log_file:
            for line in process.stderr:
                log_file.write(line)
                log_file.flush()
                if not serving.is_set():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and record.get("event") == "serving":
                        found["port"] = int(record["port"])
                        serving.set()
        serving.set()  # the process ended: stop waiting

    threading.Thread(target=pump, name=f"log-{log_path.stem}", daemon=True).start()
    serving.wait(timeout)
    return found.get("port")


def _check_serving(service: RunningService, timeout: float) -> None:
    with grpc.insecure_channel(service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(
            health_pb2.HealthCheckRequest(service=service.spec.health_name),
            timeout=timeout,
            wait_for_ready=True,
        )
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise ServiceStartError(f"{service.spec.name} reports {response.status}")
