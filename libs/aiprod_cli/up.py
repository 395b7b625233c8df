"""`aiprod up`: runs the whole mesh in the foreground until Ctrl-C or SIGTERM."""

import errno
import os
import signal
import socket
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import grpc
import typer
from rich import box
from rich.table import Table

from aiprod_cli.output import JsonOption, new_table, print_json, print_line, stderr, stdout
from aiprod_kit.apikeys import ADMIN_KEY_VARIABLE, API_KEY_VARIABLE
from aiprod_kit.certificates import DevelopmentCertificates, development_certificates
from aiprod_kit.mesh import DEVELOPMENT_TENANT, PROVIDER_BACKENDS, Mesh, RunningService, ServiceStartError

# How often the loop looks for a stop request, or a service that exited on its own.
_POLL_SECONDS = 0.2


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on the port.

    Checked before starting anything, so that every port taken is named at once (a service refuses a
    port in use, but the mesh would find them one service at a time).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR only lets the bind through connections of a stopped mesh still in TIME_WAIT.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _services_json(
    mesh: Mesh, api_key: str, certificates: DevelopmentCertificates | None
) -> dict[str, object]:
    return {
        # What a caller sets to reach the mesh (--tls), else nothing: plaintext.
        "tls": certificates.client_environment() if certificates else {},
        "data_dir": str(mesh.data_dir),
        "tenant_id": DEVELOPMENT_TENANT,
        "api_key": api_key,
        "admin_key": mesh.admin_key,
        "services": [
            {
                "name": service.spec.name,
                "health_name": service.spec.health_name,
                "address": service.address,
                "pid": service.process.pid,
                "log_path": str(service.log_path),
            }
            for service in mesh.services.values()
        ],
    }


def _services_table(mesh: Mesh) -> Table:
    # Log files relative to the data directory in the title, to fit 80 columns.
    table = new_table(
        "service",
        "address",
        "pid",
        "health name",
        "log file",
        title=f"AIPROD mesh in {mesh.data_dir}",
        box=box.SIMPLE,
    )
    for column in table.columns[:3]:  # short and read at a glance; the names and paths wrap instead
        column.no_wrap = True
    for service in mesh.services.values():
        table.add_row(
            service.spec.name,
            service.address,
            str(service.process.pid),
            service.spec.health_name or "HTTP /_sandbox/health",
            str(service.log_path.relative_to(mesh.data_dir)),
        )
    return table


def _print_tls(mesh: Mesh, certificates: DevelopmentCertificates) -> None:
    """How a caller reaches a mesh that runs mutual TLS: the CLI's settings, and grpcurl's flags."""
    stderr.print(
        f"Mutual TLS with development certificates in {certificates.directory}; a caller presents the "
        "client certificate (the CLI with these settings):",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    for variable, value in certificates.client_environment().items():
        print_line(f"{variable}={value}")
    stderr.print(
        f"grpcurl -cacert {certificates.ca} -cert {certificates.client_cert} -key {certificates.client_key} "
        f"{mesh.address('gateway')} list",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _print_keys(mesh: Mesh, api_key: str) -> None:
    """The keys, each on a line of its own as VARIABLE=value (plain, never wrapped), then how to use them."""
    stderr.print(
        f"The development tenant {DEVELOPMENT_TENANT!r} and its API key; the admin key (for `aiprod admin`):",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    print_line(f"{API_KEY_VARIABLE}={api_key}")
    print_line(f"{ADMIN_KEY_VARIABLE}={mesh.admin_key}")
    gateway = mesh.address("gateway")
    stderr.print(
        f"In another terminal: export {API_KEY_VARIABLE}={api_key}"
        + (
            ""
            if gateway.endswith(f":{mesh.services['gateway'].spec.default_port}")
            else f" AIPROD_GATEWAY={gateway}"
        )
        + ', then `aiprod render "A fox in the snow"`.',
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


class _StopRequest:
    """Set by SIGINT or SIGTERM.

    The handler only takes note: raising from it could interrupt the mesh between starting a child
    and recording it, leaving that child behind; a stop asked for during start-up happens as soon as
    the start is over. A plain flag rather than a threading.Event, whose set() could deadlock in a
    handler that interrupts the same thread inside wait().
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def _wait(mesh: Mesh, stop: _StopRequest) -> RunningService | None:
    """Waits for a stop request; returns the service that exited on its own instead, if one did."""
    while not stop.requested:
        for service in mesh.services.values():
            if service.process.poll() is not None:
                return service
        time.sleep(_POLL_SECONDS)
    return None


def up(
    data_dir: Annotated[
        Path,
        typer.Option(metavar="DIR", envvar="AIPROD_DATA_DIR", help="Where the jobs, videos and logs live."),
    ] = Path(".aiprod"),
    free_ports: Annotated[
        bool,
        typer.Option(
            "--free-ports",
            help="Bind every service to a free port instead of the documented ones (tests, a second mesh); "
            "the table or JSON shows the addresses.",
        ),
    ] = False,
    sandbox: Annotated[
        bool,
        typer.Option(
            "--sandbox",
            help="Also start the provider sandbox (port 50080) and the Runway, Veo and Replicate renderers "
            "(50061-50063) pointed at it: every backend, no credentials.",
        ),
    ] = False,
    backends: Annotated[
        str,
        typer.Option(
            metavar="NAMES",
            help="Renderers to run against the real providers, comma-separated (local,runway,veo,replicate); "
            "each provider needs its credentials in the environment (see the README).",
        ),
    ] = "local",
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="Mutual TLS on every service and between them, with development certificates (a private "
            "CA) made in DIR/tls and kept while valid; prints what a caller needs to connect.",
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Start every service (gateway on 50051, router 50052, metrics 50053, local renderer 50060).

    Waits until each reports SERVING, prints where they are, and runs until Ctrl-C or SIGTERM stops them all.

    Exits 1, with nothing left running, if a port is taken or a service fails.
    """
    names = tuple(name.strip() for name in backends.split(",") if name.strip())
    unknown = sorted(set(names) - {"local", *PROVIDER_BACKENDS})
    if unknown:
        stderr.print(f"error: --backends: unknown backend {', '.join(unknown)}", markup=False)
        raise typer.Exit(2)
    # On one's own machine, a first frame may be a local file.
    development = {
        "AIPROD_GATEWAY_ALLOW_FILE_IMAGES": os.environ.get("AIPROD_GATEWAY_ALLOW_FILE_IMAGES", "true")
    }
    # The operators' admin key: the one given, else a fresh one for this mesh (printed below).
    if os.environ.get("AIPROD_GATEWAY_ADMIN_KEY"):
        development["AIPROD_GATEWAY_ADMIN_KEY"] = os.environ["AIPROD_GATEWAY_ADMIN_KEY"]
    certificates = development_certificates(data_dir.resolve() / "tls") if tls else None
    if certificates:
        development.update(certificates.environment())
    mesh = Mesh(
        data_dir.resolve(), free_ports=free_ports, backends=names, sandbox=sandbox, environment=development
    )
    if not free_ports:
        busy = [
            f"{spec.name} ({spec.default_port})" for spec in mesh.wanted() if port_in_use(spec.default_port)
        ]
        if busy:
            stderr.print(
                f"error: ports in use: {', '.join(busy)}. Is another `aiprod up` running? "
                "--free-ports starts this one on free ports.",
                markup=False,
            )
            raise typer.Exit(1)

    stop = _StopRequest()
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            mesh.start()  # stops what it started if anything fails
        except (ServiceStartError, grpc.RpcError) as error:
            stderr.print(f"error: the mesh did not start: {error}", markup=False)
            raise typer.Exit(1) from None
        try:
            try:
                # The development tenant (made on the first run, kept in the data directory) and a new key.
                api_key = mesh.api_key
            except grpc.RpcError as error:
                stderr.print(
                    f"error: the development tenant's API key could not be made: "
                    f"{error.code().name}: {error.details()}",
                    markup=False,
                    highlight=False,
                )
                raise typer.Exit(1) from None
            if json_output:
                print_json(_services_json(mesh, api_key, certificates))
            else:
                stdout.print(_services_table(mesh))
                _print_keys(mesh, api_key)
                if certificates:
                    _print_tls(mesh, certificates)
                stderr.print("The mesh is up; Ctrl-C stops it.")
            exited = _wait(mesh, stop)
        finally:
            mesh.stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if exited is not None:
        stderr.print(
            f"error: {exited.spec.name} exited with status {exited.process.returncode}; "
            f"everything is stopped. Its log: {exited.log_path}",
            markup=False,
        )
        raise typer.Exit(1)
    stderr.print("The mesh is stopped.")
