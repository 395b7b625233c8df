"""The `aiprod` command: runs the mesh, renders videos, reviews and manages jobs, prices renders, shows
the router's backends and the tenant's usage, and manages tenants and keys."""

import typer

from aiprod_cli import admin, jobs
from aiprod_cli.alerts import alerts
from aiprod_cli.backends import backends
from aiprod_cli.budget import budget
from aiprod_cli.presets import presets
from aiprod_cli.quote import quote
from aiprod_cli.render import render
from aiprod_cli.slo import slo
from aiprod_cli.up import up
from aiprod_cli.usage import usage

app = typer.Typer(
    name="aiprod",
    help="AIPROD: turn prompts into videos through the render mesh.",
    no_args_is_help=True,
    add_completion=False,
    # Locals in tracebacks could show prompts or settings to whoever reads the terminal.
    pretty_exceptions_show_locals=False,
)
app.command()(up)
app.command()(render)
app.command()(quote)
app.command()(presets)
app.add_typer(jobs.app, name="jobs")
app.command()(usage)
app.command()(backends)
app.command()(budget)
app.command()(alerts)
app.command()(slo)
app.add_typer(admin.app, name="admin")
