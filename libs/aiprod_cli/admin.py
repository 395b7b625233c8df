"""`aiprod admin`: tenants and their API keys, through the gateway's AdminService and its admin key."""

import re
from enum import StrEnum
from typing import Annotated

import typer
from google.protobuf import duration_pb2

from aiprod.gateway.v1 import admin_pb2
from aiprod_cli.gateway import (
    CALL_TIMEOUT_SECONDS,
    DEFAULT_GATEWAY,
    AdminKeyOption,
    GatewayOption,
    connect_admin,
    exit_on_rpc_error,
)
from aiprod_cli.output import (
    JsonOption,
    api_keys_table,
    message_to_dict,
    print_json,
    print_line,
    stderr,
    stdout,
    tenants_table,
)
from aiprod_kit.apikeys import API_KEY_VARIABLE
from aiprod_kit.money import usd_from_units

app = typer.Typer(
    help="Manage tenants and their API keys (needs the gateway's admin key: AIPROD_ADMIN_KEY or --admin-key).",
    no_args_is_help=True,
)
tenants_app = typer.Typer(help="Create, list and disable tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")

# The errors of the admin service are reported with its own hints (the admin key, not an API key).
_SERVICE = "admin service"


class Tier(StrEnum):
    BRONZE = "bronze"
    GOLD = "gold"
    PLATINUM = "platinum"

    def to_proto(self) -> admin_pb2.SlaTier:
        return admin_pb2.SlaTier.Value("SLA_TIER_" + self.name)


_TTL = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_ttl(value: str | None) -> duration_pb2.Duration | None:
    """A lifetime such as 3600, 90s, 30m, 12h or 90d; None when not given."""
    if value is None:
        return None
    match = _TTL.fullmatch(value.strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise typer.BadParameter(f"{value!r} is not a positive duration such as 3600, 90s, 30m, 12h or 90d")
    ttl = duration_pb2.Duration()
    ttl.FromNanoseconds(round(float(match.group(1)) * _UNIT_SECONDS[match.group(2)] * 1e9))
    return ttl


@tenants_app.command("create")
def create_tenant(
    tenant_id: Annotated[
        str, typer.Argument(help="The tenant's id: 1 to 63 of a-z, 0-9 and -, from a letter.")
    ],
    name: Annotated[str, typer.Option(metavar="TEXT", help="Its name, for people (default: its id).")] = "",
    tier: Annotated[Tier, typer.Option(case_sensitive=False, help="Its SLA tier.")] = Tier.BRONZE,
    daily_budget: Annotated[
        float | None,
        typer.Option(
            metavar="USD", min=0, help="Its daily budget in USD (default: the ledger's per-tenant cap)."
        ),
    ] = None,
    gateway: GatewayOption = DEFAULT_GATEWAY,
    admin_key: AdminKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Create a tenant; `aiprod admin keys create` then gives it a key."""
    request = admin_pb2.CreateTenantRequest(
        tenant_id=tenant_id,
        display_name=name,
        tier=tier.to_proto(),
        daily_budget=usd_from_units(daily_budget) if daily_budget is not None else None,
    )
    with exit_on_rpc_error(gateway, _SERVICE), connect_admin(gateway, admin_key) as admin:
        tenant = admin.CreateTenant(request, timeout=CALL_TIMEOUT_SECONDS).tenant
    _print_tenants([tenant], json_output, single=True)


@tenants_app.command("list")
def list_tenants(
    gateway: GatewayOption = DEFAULT_GATEWAY,
    admin_key: AdminKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """List every tenant: tier, daily budget, enabled or disabled."""
    with exit_on_rpc_error(gateway, _SERVICE), connect_admin(gateway, admin_key) as admin:
        tenants = admin.ListTenants(admin_pb2.ListTenantsRequest(), timeout=CALL_TIMEOUT_SECONDS).tenants
    _print_tenants(list(tenants), json_output)


@tenants_app.command("disable")
def disable_tenant(
    tenant_id: Annotated[str, typer.Argument(help="The tenant's id.")],
    gateway: GatewayOption = DEFAULT_GATEWAY,
    admin_key: AdminKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Disable a tenant: its keys stop working (PERMISSION_DENIED), its jobs stay."""
    with exit_on_rpc_error(gateway, _SERVICE), connect_admin(gateway, admin_key) as admin:
        tenant = admin.DisableTenant(
            admin_pb2.DisableTenantRequest(tenant_id=tenant_id), timeout=CALL_TIMEOUT_SECONDS
        ).tenant
    _print_tenants([tenant], json_output, single=True)


def _print_tenants(tenants: list[admin_pb2.Tenant], json_output: bool, single: bool = False) -> None:
    if json_output:
        dicts = [message_to_dict(tenant) for tenant in tenants]
        print_json(dicts[0] if single else {"tenants": dicts})
    else:
        stdout.print(tenants_table(tenants))


@keys_app.command("create")
def create_key(
    tenant_id: Annotated[str, typer.Argument(help="The tenant the key is for.")],
    name: Annotated[str, typer.Option(metavar="TEXT", help="The key's name, for people.")] = "",
    ttl: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            callback=parse_ttl,
            help="How long it works, such as 3600, 30m, 12h or 90d (default: until revoked).",
        ),
    ] = None,
    gateway: GatewayOption = DEFAULT_GATEWAY,
    admin_key: AdminKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Create an API key for a tenant; its secret is shown only this once.

    The secret comes on a line of its own, `AIPROD_API_KEY=<secret>` (with --json, in "secret"): the
    gateway keeps only its hash.
    """
    request = admin_pb2.CreateApiKeyRequest(tenant_id=tenant_id, name=name, ttl=ttl)
    with exit_on_rpc_error(gateway, _SERVICE), connect_admin(gateway, admin_key) as admin:
        created = admin.CreateApiKey(request, timeout=CALL_TIMEOUT_SECONDS)
    if json_output:
        print_json({"key": message_to_dict(created.key), "secret": created.secret})
        return
    stdout.print(api_keys_table([created.key]))
    stderr.print(
        "The key's secret follows. It is shown only this once and cannot be shown again (the gateway keeps "
        "only its hash): store it now; if it is lost, revoke the key and create another.",
        markup=False,
        highlight=False,
    )
    print_line(f"{API_KEY_VARIABLE}={created.secret}")


@keys_app.command("list")
def list_keys(
    tenant: Annotated[str, typer.Option(metavar="ID", help="Only this tenant's keys.")] = "",
    prefix: Annotated[
        str, typer.Option(metavar="PREFIX", help="Only keys whose prefix starts with this.")
    ] = "",
    gateway: GatewayOption = DEFAULT_GATEWAY,
    admin_key: AdminKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """List API keys, oldest first, without their secrets: prefix, tenant, name, state, expiry."""
    request = admin_pb2.ListApiKeysRequest(tenant_id=tenant, prefix=prefix)
    with exit_on_rpc_error(gateway, _SERVICE), connect_admin(gateway, admin_key) as admin:
        keys = admin.ListApiKeys(request, timeout=CALL_TIMEOUT_SECONDS).keys
    if json_output:
        print_json({"keys": [message_to_dict(key) for key in keys]})
    else:
        stdout.print(api_keys_table(list(keys)))


@keys_app.command("revoke")
def revoke_key(
    key: Annotated[str, typer.Argument(metavar="KEY_ID", help="The key's id or its prefix (aiprod_<id>).")],
    gateway: GatewayOption = DEFAULT_GATEWAY,
    admin_key: AdminKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Revoke an API key: calls with it get UNAUTHENTICATED from then on."""
    with exit_on_rpc_error(gateway, _SERVICE), connect_admin(gateway, admin_key) as admin:
        revoked = admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(key_id=key), timeout=CALL_TIMEOUT_SECONDS
        ).key
    if json_output:
        print_json(message_to_dict(revoked))
    else:
        stdout.print(api_keys_table([revoked]))
