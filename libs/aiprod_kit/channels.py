"""Client channels to other services: traced, retried by policy, one per peer and event loop."""

import json

import grpc

from aiprod_kit.capabilities import MAX_INLINE_IMAGE_BYTES
from aiprod_kit.settings import CommonSettings
from aiprod_kit.telemetry import client_interceptors
from aiprod_kit.tls import dial_aio

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


# How soon a peer that was lost is tried again, first and at most (seconds): the mesh's channels, and the
# router's health watches, which reconnect at this pace too. gRPC's defaults (1 s, growing to 120 s)
# would leave a renderer that came back after a few minutes unreachable through a channel for up to two
# more, while its health watch already says SERVING.
RECONNECT_BACKOFF_SECONDS = (0.1, 2.0)
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", round(RECONNECT_BACKOFF_SECONDS[0] * 1000)),
    ("grpc.max_reconnect_backoff_ms", round(RECONNECT_BACKOFF_SECONDS[1] * 1000)),
]


def keepalive_options(settings: CommonSettings, server: bool = False) -> list[tuple[str, int]]:
    """gRPC keepalive (AIPROD_GRPC_KEEPALIVE_*): pings while calls are open, also on a stream that
    carries no data for minutes, so that a vanished peer fails its calls within keepalive + timeout.
    A server accepts its clients' pings at that pace rather than answering them with GOAWAY."""
    interval_ms = round(settings.grpc_keepalive_seconds * 1000)
    timeout_ms = round(settings.grpc_keepalive_timeout_seconds * 1000)
    options = [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        # The timeout gRPC really applies to an unanswered ping (a minute by default, whatever the
        # keepalive timeout says).
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if server:
        options += [
            ("grpc.http2.min_recv_ping_interval_without_data_ms", interval_ms // 2),
            ("grpc.http2.max_ping_strikes", 0),
        ]
    return options


def open_channel(
    target: str, settings: CommonSettings, health_service: str | None = None
) -> grpc.aio.Channel:
    """Opens a channel to target ("host:port", "dns:///host:port", "ipv4:a:p,b:p"); call inside the
    running loop. With health_service, round_robin sends calls only to replicas whose standard health
    reports that service SERVING (gRPC client-side health checking). TLS as AIPROD_TLS_* say."""
    config = dict(_SERVICE_CONFIG)
    if health_service:
        config["healthCheckConfig"] = {"serviceName": health_service}
    return dial_aio(
        target,
        settings.tls,
        options=[
            ("grpc.service_config", json.dumps(config)),
            ("grpc.enable_retries", 1),
            *MESSAGE_SIZE_OPTIONS,
            *RECONNECT_OPTIONS,
            *keepalive_options(settings),
        ],
        interceptors=client_interceptors(),
    )
