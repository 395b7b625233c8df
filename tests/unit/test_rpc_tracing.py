"""Which calls are traced and measured: all but health checks, reflection and the shared streams
(each render on those is observed on its own), whether the
instrumentation hands over a server's call details or a client's (whose method grpc.aio gives as bytes)."""

from types import SimpleNamespace

import pytest

from aiprod_kit.telemetry import _traced


@pytest.mark.parametrize(
    ("method", "traced"),
    [
        ("/aiprod.gateway.v1.GatewayService/CreateRenderJob", True),
        (b"/aiprod.router.v1.RouterService/ExecuteRender", True),
        ("/grpc.health.v1.Health/Check", False),
        (b"/grpc.health.v1.Health/Watch", False),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", False),
        (b"/aiprod.router.v1.RouterService/ExecuteRenders", False),
        ("/aiprod.router.v1.RouterService/ExecuteRenders", False),
        ("/aiprod.renderer.v1.RendererService/WatchRenders", False),
        ("/aiprod.renderer.v1.RendererService/WatchRender", True),
        # A service whose name merely starts like health's is traced.
        ("/grpc.health.v1.HealthReport/Get", True),
    ],
)
def test_health_reflection_and_shared_streams_are_left_out(method, traced):
    assert _traced(SimpleNamespace(method=method)) is traced
