"""AdminService: tenants and API keys, for operators (the admin key guards every call).

A tenant's daily budget is the ledger's to enforce: creating a tenant sets its cap in the metrics
service first, so that a tenant never exists without the budget it was given.
"""

import grpc
import structlog

from aiprod.gateway.v1 import admin_pb2, admin_pb2_grpc
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_gateway.auth import ApiKeyGuard
from aiprod_gateway.keys import TENANT_ID, TENANT_ID_RULE, TenantStore, new_secret
from aiprod_kit.errors import AlreadyExists, ErrorReason, InvalidArgument, NotFound, Unavailable

log = structlog.get_logger()

_LEDGER_TIMEOUT = 5.0
_MAX_NAME_CHARS = 200
# A key's life at most: ten years.
_MAX_TTL_SECONDS = 10 * 366 * 86400


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self, tenants: TenantStore, metrics: metrics_pb2_grpc.MetricsServiceStub, guard: ApiKeyGuard
    ) -> None:
        self._tenants = tenants
        self._metrics = metrics
        self._guard = guard

    async def _tenant(self, tenant_id: str) -> admin_pb2.Tenant:
        tenant = await self._tenants.get_tenant(tenant_id) if TENANT_ID.fullmatch(tenant_id) else None
        if tenant is None:
            raise NotFound(
                f"tenant {tenant_id[:64]!r} does not exist",
                reason=ErrorReason.TENANT_NOT_FOUND,
                metadata={"tenant_id": tenant_id[:64]},
            )
        return tenant

    async def CreateTenant(
        self, request: admin_pb2.CreateTenantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateTenantResponse:
        violations = []
        if not TENANT_ID.fullmatch(request.tenant_id):
            violations.append(("tenant_id", TENANT_ID_RULE))
        if len(request.display_name) > _MAX_NAME_CHARS:
            violations.append(("display_name", f"at most {_MAX_NAME_CHARS} characters"))
        if request.tier not in admin_pb2.SlaTier.values():
            violations.append(("tier", "BRONZE, GOLD or PLATINUM"))
        if request.daily_budget.amount_micros < 0 or request.daily_budget.currency_code not in ("", "USD"):
            violations.append(("daily_budget", "a non-negative amount in USD"))
        if violations:
            raise InvalidArgument(violations)
        if await self._tenants.get_tenant(request.tenant_id) is not None:
            raise AlreadyExists(
                f"tenant {request.tenant_id} already exists",
                reason=ErrorReason.TENANT_ALREADY_EXISTS,
                metadata={"tenant_id": request.tenant_id},
            )
        tenant = admin_pb2.Tenant(
            tenant_id=request.tenant_id,
            display_name=request.display_name or request.tenant_id,
            tier=request.tier or admin_pb2.SLA_TIER_BRONZE,
            daily_budget=request.daily_budget if request.HasField("daily_budget") else None,
        )
        if request.HasField("daily_budget"):
            try:
                await self._metrics.SetTenantBudget(
                    metrics_pb2.SetTenantBudgetRequest(
                        tenant_id=tenant.tenant_id, daily_cap=request.daily_budget
                    ),
                    timeout=_LEDGER_TIMEOUT,
                )
            except grpc.aio.AioRpcError as error:
                raise Unavailable(
                    f"the ledger cannot take the tenant's budget now ({error.code().name}); try again",
                    reason=ErrorReason.LEDGER_UNAVAILABLE,
                ) from error
        if not await self._tenants.create_tenant(tenant):
            raise AlreadyExists(
                f"tenant {request.tenant_id} already exists",
                reason=ErrorReason.TENANT_ALREADY_EXISTS,
                metadata={"tenant_id": request.tenant_id},
            )
        log.info("tenant created", tenant_id=tenant.tenant_id, tier=admin_pb2.SlaTier.Name(tenant.tier))
        return admin_pb2.CreateTenantResponse(tenant=tenant)

    async def ListTenants(
        self, request: admin_pb2.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListTenantsResponse:
        return admin_pb2.ListTenantsResponse(tenants=await self._tenants.list_tenants())

    async def DisableTenant(
        self, request: admin_pb2.DisableTenantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DisableTenantResponse:
        await self._tenant(request.tenant_id)
        tenant = await self._tenants.disable_tenant(request.tenant_id)
        assert tenant is not None
        self._guard.forget_tenant(tenant.tenant_id)
        log.info("tenant disabled", tenant_id=tenant.tenant_id)
        return admin_pb2.DisableTenantResponse(tenant=tenant)

    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateApiKeyResponse:
        violations = []
        if len(request.name) > _MAX_NAME_CHARS:
            violations.append(("name", f"at most {_MAX_NAME_CHARS} characters"))
        ttl = request.ttl.seconds + request.ttl.nanos / 1e9
        if request.HasField("ttl") and not 0 < ttl <= _MAX_TTL_SECONDS:
            violations.append(("ttl", "more than 0 s and at most ten years"))
        if violations:
            raise InvalidArgument(violations)
        tenant = await self._tenant(request.tenant_id)
        key_id, secret = new_secret()
        key = admin_pb2.ApiKey(key_id=key_id, tenant_id=tenant.tenant_id, name=request.name)
        await self._tenants.create_key(key, secret, round(ttl * 1e6) if request.HasField("ttl") else None)
        log.info("api key created", tenant_id=tenant.tenant_id, key=key.prefix)
        return admin_pb2.CreateApiKeyResponse(key=key, secret=secret)

    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListApiKeysResponse:
        if request.tenant_id:
            await self._tenant(request.tenant_id)
        return admin_pb2.ListApiKeysResponse(
            keys=await self._tenants.list_keys(request.tenant_id, request.prefix)
        )

    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeApiKeyResponse:
        key = await self._tenants.revoke_key(request.key_id) if len(request.key_id) <= 64 else None
        if key is None:
            raise NotFound(
                f"API key {request.key_id[:64]!r} does not exist",
                reason=ErrorReason.API_KEY_NOT_FOUND,
                metadata={"key_id": request.key_id[:64]},
            )
        self._guard.forget(key.key_id)
        log.info("api key revoked", tenant_id=key.tenant_id, key=key.prefix)
        return admin_pb2.RevokeApiKeyResponse(key=key)
