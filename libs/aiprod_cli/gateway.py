"""The CLI's connection to the gateway, and how the gateway's errors reach the user."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import grpc
import typer
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiprod.gateway.v1 import gateway_pb2_grpc
from aiprod_cli.output import stderr
from aiprod_kit.channels import MESSAGE_SIZE_OPTIONS
from aiprod_kit.settings import GATEWAY_PORT

GatewayOption = Annotated[
    str,
    typer.Option("--gateway", metavar="ADDRESS", envvar="AIPROD_GATEWAY", help="The gateway's host:port."),
]
DEFAULT_GATEWAY = f"localhost:{GATEWAY_PORT}"

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
    channel: grpc.Channel
    stub: gateway_pb2_grpc.GatewayServiceStub


@contextmanager
def connect(address: str) -> Iterator[Gateway]:
    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        yield Gateway(address, channel, gateway_pb2_grpc.GatewayServiceStub(channel))


def report_rpc_error(error: grpc.RpcError, address: str, service: str = "gateway") -> None:
    """Prints the status and every field the service named as bad (google.rpc.BadRequest) on stderr."""
    # grpc raises errors that are also grpc.Call objects: they carry the status and its details.
    code = error.code()
    stderr.print(f"error: {code.name}: {error.details()}", markup=False, highlight=False)
    if code == grpc.StatusCode.UNAVAILABLE:
        stderr.print(f"is the {service} running at {address}? `aiprod up` starts it.", markup=False)
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
