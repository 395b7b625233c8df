"""The sandbox's HTTP server: the three provider APIs, the output downloads and the control API.

Control API (JSON):
- `GET /_sandbox/health` → `{"status": "SERVING"}`.
- `POST /_sandbox/faults` with a rule (or a list of rules, see faults.py) → the queued rule(s);
  `GET /_sandbox/faults` → `[rule, ...]` with each rule's `fired` and `remaining` counts;
  `DELETE /_sandbox/faults` clears them and answers `[]`.
- `GET /_sandbox/counters` → `{"creates", "create_requests", "tasks", "requests"}` (see counters.py),
  and beside them what the providers would bill (see billing.py): `"billing": {provider: {task_id:
  {"micros", "state", "key", "model"}}}`, `"billed_total_micros": {provider: micros}` and
  `"billed_total_micros_all"`, every provider listed; only tasks in their final state are billed.
- `POST /_sandbox/config` with `{"provider": optional, key: value, ...}` (keys in config.py) → the
  configuration in force, per provider; `GET /_sandbox/config` reads it.
- `POST /_sandbox/reset` stops and deletes every task and file, and clears counters, bills, faults and
  configuration changes.
"""

import asyncio
import json
import signal
import socket
from typing import Any

from aiohttp import web

from aiprod_kit.logs import configure_logging
from aiprod_kit.settings import ConfigurationError
from aiprod_sandbox.config import ConfigError
from aiprod_sandbox.faults import FaultError
from aiprod_sandbox.replicate import ReplicateApi
from aiprod_sandbox.runway import RunwayApi
from aiprod_sandbox.settings import SandboxSettings
from aiprod_sandbox.state import Sandbox
from aiprod_sandbox.vertex import VertexApi

# Requests still in flight at shutdown (a hung fault, a `Prefer: wait`) are cut after this long.
_SHUTDOWN_SECONDS = 1.0
_SANDBOX_KEY = web.AppKey("sandbox", Sandbox)


def _download_error(status: int, message: str | None = None) -> web.Response:
    """Object storage answers in plain text, whichever provider's URL it is."""
    return web.Response(status=status, text=message or f"HTTP {status}")


async def _download(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[_SANDBOX_KEY]
    output = sandbox.outputs.find(request.match_info["token"])
    if output is None:
        return _download_error(404, "Not found")

    async def serve(_: web.Request) -> web.StreamResponse:
        if output.expired or not output.path.exists():
            return output.expired_response()
        return web.FileResponse(output.path, headers={"Content-Type": "video/mp4"})

    handler = sandbox.endpoint(output.provider, "download", _download_error, lambda _: None, serve)
    return await handler(request)


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError as invalid:
        body = json.dumps({"error": "the body is not valid JSON"})
        raise web.HTTPBadRequest(text=body, content_type="application/json") from invalid


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def _health(_: web.Request) -> web.Response:
    return web.json_response({"status": "SERVING"})


async def _add_faults(request: web.Request) -> web.Response:
    sandbox = request.app[_SANDBOX_KEY]
    payload = await _json_body(request)
    try:
        if isinstance(payload, list):
            return web.json_response([sandbox.faults.add(rule).as_json() for rule in payload])
        return web.json_response(sandbox.faults.add(payload).as_json())
    except FaultError as invalid:
        return _bad_request(str(invalid))


async def _list_faults(request: web.Request) -> web.Response:
    return web.json_response([rule.as_json() for rule in request.app[_SANDBOX_KEY].faults.rules()])


async def _clear_faults(request: web.Request) -> web.Response:
    request.app[_SANDBOX_KEY].faults.clear()
    return web.json_response([])


async def _counters(request: web.Request) -> web.Response:
    sandbox = request.app[_SANDBOX_KEY]
    return web.json_response({**sandbox.counters.as_json(), **sandbox.billing.as_json()})


async def _get_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[_SANDBOX_KEY].config.as_json())


async def _set_config(request: web.Request) -> web.Response:
    sandbox = request.app[_SANDBOX_KEY]
    try:
        sandbox.configure(await _json_body(request))
    except ConfigError as invalid:
        return _bad_request(str(invalid))
    return web.json_response(sandbox.config.as_json())


async def _reset(request: web.Request) -> web.Response:
    await request.app[_SANDBOX_KEY].reset()
    return web.json_response({"status": "reset"})


def build_app(sandbox: Sandbox) -> web.Application:
    app = web.Application()
    app[_SANDBOX_KEY] = sandbox
    app.add_routes(
        [
            web.get("/_sandbox/health", _health),
            web.post("/_sandbox/faults", _add_faults),
            web.get("/_sandbox/faults", _list_faults),
            web.delete("/_sandbox/faults", _clear_faults),
            web.get("/_sandbox/counters", _counters),
            web.get("/_sandbox/config", _get_config),
            web.post("/_sandbox/config", _set_config),
            web.post("/_sandbox/reset", _reset),
            web.get(r"/outputs/{token:[A-Za-z0-9_-]+}.mp4", _download),
            *RunwayApi(sandbox).routes(),
            *VertexApi(sandbox).routes(),
            *ReplicateApi(sandbox).routes(),
        ]
    )
    return app


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {error.strerror}") from error


async def serve(settings: SandboxSettings) -> None:
    log = configure_logging("sandbox", settings.log_level, settings.log_format)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    sandbox = Sandbox.create(
        settings.data_dir,
        settings.sandbox_render_seconds,
        settings.accepted_keys,
        settings.sandbox_video_short_side,
    )
    # Handlers are cancelled when their client goes away, so a hung request ends with its client.
    runner = web.AppRunner(
        build_app(sandbox), handler_cancellation=True, shutdown_timeout=_SHUTDOWN_SECONDS, access_log=None
    )
    await runner.setup()
    listener = _listening_socket(settings.host, settings.sandbox_port)
    await web.SockSite(runner, listener).start()
    # Supervisors and tests read the bound port from this line when they asked for port 0.
    log.info("serving", port=listener.getsockname()[1], host=settings.host)

    await stop.wait()
    log.info("draining", grace_seconds=_SHUTDOWN_SECONDS)
    await runner.cleanup()
    # The sandbox's state lives in memory only: its videos would be orphans after it.
    await sandbox.reset()
    log.info("stopped")
