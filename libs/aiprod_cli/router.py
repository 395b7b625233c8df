"""The CLI's connection to the router, for what only the router knows: its backends and its route plans."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from aiprod.router.v1 import router_pb2_grpc
from aiprod_cli.gateway import open_channel
from aiprod_kit.settings import ROUTER_PORT

RouterOption = Annotated[
    str,
    typer.Option("--router", metavar="ADDRESS", envvar="AIPROD_ROUTER", help="The router's host:port."),
]
DEFAULT_ROUTER = f"localhost:{ROUTER_PORT}"


@contextmanager
def connect_router(address: str) -> Iterator[router_pb2_grpc.RouterServiceStub]:
    with open_channel(address) as channel:
        yield router_pb2_grpc.RouterServiceStub(channel)
