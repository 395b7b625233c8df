"""Client channels to other services: traced, retried by policy, one per peer and event loop."""

import json

import grpc

from aiprod_kit.telemetry import client_interceptors

# Retries of calls that never reached a server (UNAVAILABLE), as gRPC service config rather than
# hand-written loops. Streams are retried by gRPC only until their first response.
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def open_channel(target: str) -> grpc.aio.Channel:
    """Opens a channel to target ("host:port" or "dns:///host:port"); call inside the running loop."""
    return grpc.aio.insecure_channel(
        target,
        options=[("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1)],
        interceptors=client_interceptors(),
    )
