"""The CLI's connection to the gateway, and how the gateway's errors reach the user."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import grpc
import typer
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiprod.gateway.v1 import admin_pb2_grpc, gateway_pb2_grpc
from aiprod_cli.output import stderr
from aiprod_kit.apikeys import ADMIN_KEY_VARIABLE, API_KEY_VARIABLE, with_api_key
from aiprod_kit.channels import MESSAGE_SIZE_OPTIONS
from aiprod_kit.errors import ErrorReason, error_info, error_reason, retry_delay
from aiprod_kit.settings import GATEWAY_PORT
from aiprod_kit.tls import TlsSettings, dial

GatewayOption = Annotated[
    str,
    typer.Option("--gateway", metavar="ADDRESS", envvar="AIPROD_GATEWAY", help="The gateway's host:port."),
]
DEFAULT_GATEWAY = f"localhost:{GATEWAY_PORT}"
# The key is a secret: never shown as a default in --help, never echoed in an error.
ApiKeyOption = Annotated[
    str,
    typer.Option(
        "--api-key",
        metavar="KEY",
        envvar=API_KEY_VARIABLE,
        show_default=False,
        show_envvar=True,
        help="The tenant's API key (`aiprod up` prints the development tenant's).",
    ),
]
AdminKeyOption = Annotated[
    str,
    typer.Option(
        "--admin-key",
        metavar="KEY",
        envvar=ADMIN_KEY_VARIABLE,
        show_default=False,
        show_envvar=True,
        help="The gateway's admin key, AIPROD_GATEWAY_ADMIN_KEY on the gateway (`aiprod up` prints it).",
    ),
]

# Unary calls are quick; a gateway that does not answer within this is stuck or unreachable.
CALL_TIMEOUT_SECONDS = 30.0
# The exit status of a call the gateway refused (bad input, unknown job, job already ended...).
EXIT_RPC_ERROR = 2

# gRPC's default reconnect backoff grows to two minutes; a watch resuming after a gateway restart
# should notice the gateway within seconds.
# Jobs may carry an inline first frame up to the documented size: read them as the mesh does.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    *MESSAGE_SIZE_OPTIONS,
]


@dataclass(frozen=True)
class Gateway:
    address: str
    # The channel itself (its connectivity, to wait for a restarted gateway); the stub's calls carry the key.
    channel: grpc.Channel
    stub: gateway_pb2_grpc.GatewayServiceStub


_MISSING_KEY_HINTS = {
    API_KEY_VARIABLE: "export AIPROD_API_KEY=<key> as `aiprod up` prints it (or pass --api-key)",
    ADMIN_KEY_VARIABLE: "export AIPROD_ADMIN_KEY=<key> as `aiprod up` prints it (the gateway's "
    "AIPROD_GATEWAY_ADMIN_KEY), or pass --admin-key",
}
# Exit status of a command that cannot call at all (no key): a usage error, as click's own.
EXIT_USAGE = 2


def require_key(key: str, variable: str = API_KEY_VARIABLE) -> str:
    """The key, stripped; without one, a one-line error saying where to get it and EXIT_USAGE."""
    key = key.strip()
    if not key:
        kind = "admin key" if variable == ADMIN_KEY_VARIABLE else "API key"
        stderr.print(
            f"error: no {kind}: {_MISSING_KEY_HINTS[variable]}", markup=False, highlight=False, soft_wrap=True
        )
        raise typer.Exit(EXIT_USAGE)
    return key


def open_channel(address: str, options: list[tuple[str, int]] | None = None) -> grpc.Channel:
    """A channel to a service of the mesh, with TLS as AIPROD_TLS_* say (exits naming a setting that
    is missing or unreadable)."""
    tls = TlsSettings()
    if problems := tls.problems(server=False):
        stderr.print(f"error: {'; '.join(problems)}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE)
    return dial(address, tls, options)


@contextmanager
def connect(address: str, api_key: str) -> Iterator[Gateway]:
    """The gateway, every call of its stub with the API key (exits with a hint when there is none)."""
    key = require_key(api_key)
    with open_channel(address, _CHANNEL_OPTIONS) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(with_api_key(channel, key))
        yield Gateway(address, channel, stub)


@contextmanager
def connect_admin(address: str, admin_key: str) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    """The gateway's AdminService, every call with the admin key (exits with a hint when there is none)."""
    key = require_key(admin_key, ADMIN_KEY_VARIABLE)
    with open_channel(address, _CHANNEL_OPTIONS) as channel:
        yield admin_pb2_grpc.AdminServiceStub(with_api_key(channel, key))


def _unauthenticated_hint(service: str) -> str:
    if service == "admin service":
        return (
            "hint: the gateway refused the admin key: AIPROD_ADMIN_KEY (or --admin-key) must be the "
            "gateway's AIPROD_GATEWAY_ADMIN_KEY, as `aiprod up` prints it"
        )
    return (
        "hint: the gateway refused the API key: export AIPROD_API_KEY as `aiprod up` prints it, or use "
        "a key `aiprod admin keys create` made that is not revoked or expired"
    )


def error_metadata(error: grpc.RpcError) -> dict[str, str]:
    """The metadata of the error's google.rpc.ErrorInfo (empty when it has none)."""
    info = error_info(error)
    return dict(info.metadata) if info is not None else {}


def report_rpc_error(error: grpc.RpcError, address: str, service: str = "gateway") -> None:
    """Prints the status and every field the service named as bad (google.rpc.BadRequest) on stderr."""
    # grpc raises errors that are also grpc.Call objects: they carry the status and its details.
    code = error.code()
    stderr.print(f"error: {code.name}: {error.details()}", markup=False, highlight=False, soft_wrap=True)
    if code == grpc.StatusCode.UNAVAILABLE:
        where = "gateway" if service == "admin service" else service
        stderr.print(f"is the {where} running at {address}? `aiprod up` starts it.", markup=False)
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        stderr.print(_unauthenticated_hint(service), markup=False, highlight=False, soft_wrap=True)
    elif error_reason(error) == ErrorReason.PLAN_VERSION_STALE:
        metadata = error_metadata(error)
        job_id = metadata.get("job_id", "JOB_ID")
        stderr.print(
            f"the plan changed since: it is now at version {metadata.get('current_version', '?')}; "
            f"`aiprod jobs revisions {job_id}` shows what changed",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    delay = retry_delay(error)
    if delay is not None:
        stderr.print(f"try again in {delay:.0f} s", markup=False)
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                stderr.print(f"  {violation.field}: {violation.description}", markup=False, highlight=False)


@contextmanager
def exit_on_rpc_error(address: str, service: str = "gateway") -> Iterator[None]:
    """Turns a refused call into its report and EXIT_RPC_ERROR instead of a traceback."""
    try:
        yield
    except grpc.RpcError as error:
        report_rpc_error(error, address, service)
        raise typer.Exit(EXIT_RPC_ERROR) from None
