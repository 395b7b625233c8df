"""`make demo`: starts a private mesh with the provider sandbox, renders a sample prompt on every
backend through the gateway, stops the mesh.

The mesh runs on free ports, so that it never clashes with an `aiprod up` already running, and its
provider renderers talk to the sandbox, so no credentials are needed. Each video's absolute path is
printed as it is ready; the local renderer's comes last.
"""

import sys
from pathlib import Path

import grpc
import typer

from aiprod_cli.output import stderr
from aiprod_cli.render import render
from aiprod_cli.spec import AspectRatio, Backend
from aiprod_kit.mesh import Mesh, ServiceStartError

SAMPLE_PROMPT = "A paper boat sailing across a sunlit pond"
DATA_DIR = Path(".aiprod/demo")
# Each backend with a duration its default model renders (Veo: 4, 6 or 8 s; Replicate video-01: 6 s).
RENDERS = ((Backend.RUNWAY, 4.0), (Backend.VEO, 4.0), (Backend.REPLICATE, 6.0), (Backend.LOCAL, 5.0))
# Each render's own price limit, in USD: the default preset's (8 USD a minute, 0.53 USD for 4 s) leaves
# Veo out (0.80 USD for 4 s), and the router would take the preferred render elsewhere. The sandbox bills
# nothing real.
MAX_COST_USD = 1.0
# The sandbox is ours: no need to poll it as sparingly as the real providers ask.
SANDBOX_POLLING = {f"AIPROD_{name}_POLL_SECONDS": "0.5" for name in ("RUNWAY", "VEO", "REPLICATE")}


def main() -> int:
    mesh = Mesh(DATA_DIR.resolve(), free_ports=True, sandbox=True, environment=SANDBOX_POLLING)
    try:
        stderr.print(f"Starting the mesh in {mesh.data_dir}…", markup=False)
        mesh.start()
        # As `aiprod up` does: the development tenant and its key, which every render sends.
        api_key = mesh.api_key
        # The `aiprod render` command itself, so that the demo shows exactly what users run; each
        # prints its video's path last.
        for backend, seconds in RENDERS:
            stderr.print(f"Rendering on {backend.value}…", markup=False)
            render(
                SAMPLE_PROMPT,
                duration=seconds,
                aspect_ratio=AspectRatio.LANDSCAPE,
                backend=backend,
                max_cost=MAX_COST_USD,
                gateway=mesh.address("gateway"),
                api_key=api_key,
            )
    except (ServiceStartError, grpc.RpcError) as error:
        stderr.print(f"error: the mesh did not start: {error}", markup=False)
        return 1
    except typer.Exit as exit_:
        return exit_.exit_code
    finally:
        mesh.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
