"""`make demo`: starts a private mesh, renders a sample video through the gateway, stops the mesh.

The mesh runs on free ports, so that it never clashes with an `aiprod up` already running. The
video's absolute path is the last line on stdout.
"""

import sys
from pathlib import Path

import typer

from aiprod_cli.output import stderr
from aiprod_cli.render import AspectRatio, render
from aiprod_kit.mesh import Mesh, ServiceStartError

SAMPLE_PROMPT = "A paper boat sailing across a sunlit pond"
DATA_DIR = Path(".aiprod/demo")


def main() -> int:
    mesh = Mesh(DATA_DIR.resolve(), free_ports=True)
    try:
        stderr.print(f"Starting the mesh in {mesh.data_dir}…", markup=False)
        mesh.start()
        # The `aiprod render` command itself, so that the demo shows exactly what users run; it
        # prints the video's path last.
        render(
            SAMPLE_PROMPT, duration=5.0, aspect_ratio=AspectRatio.LANDSCAPE, gateway=mesh.address("gateway")
        )
    except ServiceStartError as error:
        stderr.print(f"error: the mesh did not start: {error}", markup=False)
        return 1
    except typer.Exit as exit_:
        return exit_.exit_code
    finally:
        mesh.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
