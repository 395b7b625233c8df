"""Who may call the gateway: the guards the service bootstrap runs before every handler.

GatewayService: `authorization: Bearer <API key>`; the key's tenant becomes the call's tenant
(`aiprod_gateway.tenancy.current_tenant`). A missing, malformed, unknown, revoked or expired key gets
UNAUTHENTICATED, a disabled tenant PERMISSION_DENIED; nothing of the presented key is ever echoed or
logged. AdminService: the operators' admin key (AIPROD_GATEWAY_ADMIN_KEY).

A key proven once is trusted for a few seconds (`gateway_key_cache_seconds`) without a look at the
store, so a call costs no database read; a key revoked by this replica stops at once, by another
replica within that time.

Every refusal goes through the guard's `AuthFailures` (aiprod_gateway.auth_failures): counted by reason,
logged once a window per peer, and answered after a growing wait once a peer keeps failing. The peer
comes from the call's context, the guards' optional second argument; a guard called without it counts
every caller as one unknown peer.
"""

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from aiprod.gateway.v1 import admin_pb2, gateway_pb2
from aiprod_gateway.auth_failures import AuthFailures, calling_peer
from aiprod_gateway.keys import TenantStore, key_prefix
from aiprod_gateway.tenancy import Tenant, set_current_tenant
from aiprod_kit.errors import ErrorReason, PermissionDenied, Unauthenticated

_HOW = "send the metadata `authorization: Bearer <API key>`"
# Resolved keys kept at most; the oldest go first.
_CACHE_SIZE = 10_000
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


def bearer(context: grpc.aio.ServicerContext) -> str:
    """The call's bearer token; UNAUTHENTICATED when there is none."""
    for name, value in context.invocation_metadata() or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            break
    raise Unauthenticated(f"no API key: {_HOW}")


@dataclass(frozen=True)
class _Resolved:
    tenant: Tenant
    # monotonic time until which the resolution is trusted; the key's own expiry, in epoch seconds.
    fresh_until: float
    expires_at: float | None


class ApiKeyGuard:
    """The GatewayService guard. admit: called with each call's tenant once its key is proven (the
    tier's request rate); its refusals are no authentication failures."""

    def __init__(
        self,
        tenants: TenantStore,
        cache_seconds: float,
        admit: Callable[[Tenant], Awaitable[None]] | None = None,
        failures: AuthFailures | None = None,
    ) -> None:
        self._tenants = tenants
        self._cache_seconds = cache_seconds
        self._admit = admit
        self._cache: dict[str, _Resolved] = {}
        self._failures = failures or AuthFailures(GATEWAY_SERVICE)

    async def __call__(self, context: grpc.aio.ServicerContext) -> None:
        try:
            tenant = await self._resolve(bearer(context))
        except (Unauthenticated, PermissionDenied) as refusal:
            await self._failures.refused(calling_peer(context), refusal)
            raise
        # Windows that ended get their summary line even when no failure follows them.
        self._failures.sweep()
        set_current_tenant(tenant)
        if self._admit is not None:
            await self._admit(tenant)

    def forget(self, key_id: str) -> None:
        """Stops trusting a key at once (revoked here)."""
        prefix = key_prefix(key_id)
        for digest, resolved in list(self._cache.items()):
            if resolved.tenant.key_prefix == prefix:
                del self._cache[digest]

    def forget_tenant(self, tenant_id: str) -> None:
        for digest, resolved in list(self._cache.items()):
            if resolved.tenant.tenant_id == tenant_id:
                del self._cache[digest]

    async def _resolve(self, secret: str) -> Tenant:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached.fresh_until > now:
            if cached.expires_at is not None and time.time() >= cached.expires_at:
                raise Unauthenticated("the API key has expired")
            return cached.tenant
        match = await self._tenants.match(secret)
        if match is None:
            raise Unauthenticated(
                f"the API key is not valid: {_HOW} with a key `aiprod admin keys create` made"
            )
        key, tenant = match.key, match.tenant
        if key.HasField("revoke_time"):
            raise Unauthenticated(f"the API key {key.prefix} was revoked")
        expires_at = key.expire_time.ToMicroseconds() / 1e6 if key.HasField("expire_time") else None
        if expires_at is not None and time.time() >= expires_at:
            raise Unauthenticated(f"the API key {key.prefix} has expired")
        if tenant.disabled:
            raise PermissionDenied(
                f"tenant {tenant.tenant_id} is disabled",
                reason=ErrorReason.TENANT_DISABLED,
                metadata={"tenant_id": tenant.tenant_id},
            )
        resolved = Tenant(
            tenant_id=tenant.tenant_id,
            tier=tenant.tier or admin_pb2.SLA_TIER_BRONZE,
            daily_budget_micros=tenant.daily_budget.amount_micros,
            key_prefix=key.prefix,
        )
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[digest] = _Resolved(resolved, now + self._cache_seconds, expires_at)
        return resolved


class AdminKeyGuard:
    """The AdminService guard: the operators' key, compared in constant time."""

    def __init__(self, admin_key: str, failures: AuthFailures | None = None) -> None:
        self._digest = hashlib.sha256(admin_key.encode()).digest() if admin_key else None
        self._failures = failures or AuthFailures(ADMIN_SERVICE)

    async def __call__(self, context: grpc.aio.ServicerContext) -> None:
        try:
            self._check(context)
        except (Unauthenticated, PermissionDenied) as refusal:
            await self._failures.refused(calling_peer(context), refusal)
            raise
        self._failures.sweep()

    def _check(self, context: grpc.aio.ServicerContext) -> None:
        if self._digest is None:
            raise PermissionDenied("the admin service is off: no AIPROD_GATEWAY_ADMIN_KEY is configured")
        presented = hashlib.sha256(bearer(context).encode()).digest()
        if not hmac.compare_digest(presented, self._digest):
            raise Unauthenticated("the admin key is not valid")
