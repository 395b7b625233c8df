"""What the gateway knows of the backends, for validating requests without a call per request."""

import time

import grpc

from aiprod.common.v1 import render_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.capabilities import backend_name, shot_mismatches
from aiprod_kit.errors import InvalidArgument

_FRESH_SECONDS = 10.0
_LIST_TIMEOUT = 2.0


class BackendCatalog:
    """The router's ListBackends, fetched at most every few seconds."""

    def __init__(self, router: router_pb2_grpc.RouterServiceStub) -> None:
        self._router = router
        self._backends: list[router_pb2.BackendStatus] = []
        self._fetched_at = -_FRESH_SECONDS

    async def backends(self) -> list[router_pb2.BackendStatus]:
        if time.monotonic() - self._fetched_at >= _FRESH_SECONDS:
            try:
                response = await self._router.ListBackends(
                    router_pb2.ListBackendsRequest(), timeout=_LIST_TIMEOUT
                )
            except grpc.aio.AioRpcError:
                return self._backends  # the router is away: check against what was last known
            self._backends = list(response.backends)
            self._fetched_at = time.monotonic()
        return self._backends

    async def check_renderable(self, shot: render_pb2.Shot) -> None:
        """INVALID_ARGUMENT when no known backend can render the shot at all (whatever its health)."""
        known = [status for status in await self.backends() if status.HasField("capabilities")]
        if not known:
            return  # nothing known yet: the router decides when the job runs
        violations: dict[str, list[str]] = {}
        for status in known:
            mismatches = shot_mismatches(shot, status.capabilities)
            if not mismatches:
                return
            for field, why in mismatches:
                name = backend_name(status.backend)
                violations.setdefault(f"spec.{field}", []).append(f"{name} {why}")
        raise InvalidArgument([(field, "; ".join(reasons)) for field, reasons in violations.items()])
