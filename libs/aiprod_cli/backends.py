"""`aiprod backends`: the router's backends, with their health, breaker and recent figures."""

from aiprod.router.v1 import router_pb2
from aiprod_cli.gateway import CALL_TIMEOUT_SECONDS, exit_on_rpc_error
from aiprod_cli.output import JsonOption, backends_table, message_to_dict, print_json, stdout
from aiprod_cli.router import DEFAULT_ROUTER, RouterOption, connect_router


def backends(router: RouterOption = DEFAULT_ROUTER, json_output: JsonOption = False) -> None:
    """List the router's backends: health, breaker, p95 latency, success rate, QC average, price, renders.

    The figures cover the router's recent renders on each backend: "-" until there is one.

    Exits 2 when the router cannot be reached.
    """
    with exit_on_rpc_error(router, "router"), connect_router(router) as stub:
        response = stub.ListBackends(router_pb2.ListBackendsRequest(), timeout=CALL_TIMEOUT_SECONDS)
    if json_output:
        print_json({"backends": [message_to_dict(status) for status in response.backends]})
    else:
        stdout.print(backends_table(list(response.backends)))
