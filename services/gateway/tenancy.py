"""Who is calling: the tenant an API key names, for the length of one call.

The auth interceptor (`aiprod_gateway.auth`) resolves the caller's key once per call and sets the
tenant here; handlers and the modules they call read it with `current_tenant()`.
"""

import contextvars
from dataclasses import dataclass

from aiprod.gateway.v1 import admin_pb2


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    tier: int  # admin_pb2.SlaTier value, never UNSPECIFIED
    # The tenant's own daily cap in micros; 0: none of its own (the ledger's default applies).
    daily_budget_micros: int
    # The calling key's prefix ("aiprod_<key_id>"), recorded as the author of edits and approvals.
    key_prefix: str = ""


_CURRENT: contextvars.ContextVar[Tenant] = contextvars.ContextVar("aiprod_tenant")


def current_tenant() -> Tenant:
    """The calling tenant; only inside a call the auth interceptor let through."""
    return _CURRENT.get()


def set_current_tenant(tenant: Tenant) -> contextvars.Token[Tenant]:
    return _CURRENT.set(tenant)


def tier_name(tier: int) -> str:
    """ "GOLD" for SLA_TIER_GOLD."""
    return admin_pb2.SlaTier.Name(tier).removeprefix("SLA_TIER_")
