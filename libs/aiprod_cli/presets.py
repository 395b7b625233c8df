"""`aiprod presets`: the presets a job can use, with their floors, durations, price limits and review step."""

from aiprod.gateway.v1 import gateway_pb2
from aiprod_cli.gateway import (
    CALL_TIMEOUT_SECONDS,
    DEFAULT_GATEWAY,
    ApiKeyOption,
    GatewayOption,
    connect,
    exit_on_rpc_error,
)
from aiprod_cli.output import JsonOption, message_to_dict, presets_table, print_json, stdout


def presets(
    gateway: GatewayOption = DEFAULT_GATEWAY,
    api_key: ApiKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """List the presets a job can use, with their limits and prices.

    Shows each one's pipeline, quality floor, longest and default duration, price limit per minute of
    video, whether its jobs wait for approval, and its dispatch priority.

    Exits 2 when the gateway refuses or cannot be reached.
    """
    with exit_on_rpc_error(gateway), connect(gateway, api_key) as connection:
        response = connection.stub.ListPresets(gateway_pb2.ListPresetsRequest(), timeout=CALL_TIMEOUT_SECONDS)
    if json_output:
        print_json({"presets": [message_to_dict(preset) for preset in response.presets]})
    else:
        stdout.print(presets_table(list(response.presets)))
