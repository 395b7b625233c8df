"""Client channels to other services: traced, retried by policy, one per peer and event loop."""

import json

import grpc

from aiprod_kit.capabilities import MAX_INLINE_IMAGE_BYTES
from aiprod_kit.telemetry import client_interceptors

# gRPC's default 4 MiB receive limit would refuse the inline first frame the API documents (up to
# MAX_INLINE_IMAGE_BYTES) with RESOURCE_EXHAUSTED before validation could name the field. A job carries
# that image twice (its spec and its plan's shot), plus a few MiB for everything else it holds.
MAX_MESSAGE_BYTES = 2 * MAX_INLINE_IMAGE_BYTES + 4 * 1024 * 1024
# For every server and channel of the mesh (and any client that reads jobs with inline images).
MESSAGE_SIZE_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

# Retries of calls that never reached a server (UNAVAILABLE), as gRPC service config rather than
# hand-written loops. Streams are retried by gRPC only until their first response.
_SERVICE_CONFIG = {
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


def open_channel(target: str, health_service: str | None = None) -> grpc.aio.Channel:
    """Opens a channel to target ("host:port", "dns:///host:port", "ipv4:a:p,b:p"); call inside the
    running loop. With health_service, round_robin sends calls only to replicas whose standard health
    reports that service SERVING (gRPC client-side health checking)."""
    config = dict(_SERVICE_CONFIG)
    if health_service:
        config["healthCheckConfig"] = {"serviceName": health_service}
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.service_config", json.dumps(config)),
            ("grpc.enable_retries", 1),
            *MESSAGE_SIZE_OPTIONS,
        ],
        interceptors=client_interceptors(),
    )
