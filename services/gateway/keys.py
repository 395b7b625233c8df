"""Tenants and their API keys, kept in the gateway's database beside the jobs.

A key reads `aiprod_<key_id>_<secret>`: the key id (12 hex digits) finds its row, and only the SHA-256
of the whole key is stored, compared in constant time. Keys carry 192 random bits, so a fast hash is
enough (no password stretching is needed against guessing). The key's prefix, `aiprod_<key_id>`, is
what lists, logs and plan revisions show.
"""

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from aiprod.gateway.v1 import admin_pb2
from aiprod_kit.database import Database

_KEY = re.compile(r"aiprod_([0-9a-f]{12})_([A-Za-z0-9_-]{32})")
TENANT_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
TENANT_ID_RULE = "1 to 63 characters from [a-z0-9-], starting with a letter"
# Compared against when a key's id is unknown, so that a miss costs what a hit does.
_NO_HASH = hashlib.sha256(b"no such key").hexdigest()

_SCHEMAS = {
    "sqlite": """
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id TEXT PRIMARY KEY,
    tenant BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    api_key BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant_id, key_id);
""",
    "postgresql": """
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id TEXT PRIMARY KEY,
    tenant BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    api_key BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant_id, key_id);
""",
}


def new_secret() -> tuple[str, str]:
    """A fresh key: (key id, the whole key)."""
    key_id = secrets.token_hex(6)
    return key_id, f"aiprod_{key_id}_{secrets.token_urlsafe(24)}"


def key_prefix(key_id: str) -> str:
    return f"aiprod_{key_id}"


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> timestamp_pb2.Timestamp:
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return now


@dataclass(frozen=True)
class KeyMatch:
    """A key the caller proved to hold: its record and its tenant's."""

    key: admin_pb2.ApiKey
    tenant: admin_pb2.Tenant


class TenantStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    @classmethod
    async def open(cls, database: Database) -> "TenantStore":
        await database.create_schema(_SCHEMAS)
        return cls(database)

    # Tenants --------------------------------------------------------------------------------------

    async def get_tenant(self, tenant_id: str) -> admin_pb2.Tenant | None:
        row = await self._db.fetchone("SELECT tenant FROM tenants WHERE tenant_id = ?", (tenant_id,))
        return admin_pb2.Tenant.FromString(row[0]) if row else None

    async def create_tenant(self, tenant: admin_pb2.Tenant) -> bool:
        """Stores a new tenant; False when its id is taken (nothing changes then)."""
        async with self._db.transaction() as transaction:
            await transaction.lock(f"tenant:{tenant.tenant_id}")
            row = await transaction.fetchone("SELECT 1 FROM tenants WHERE tenant_id = ?", (tenant.tenant_id,))
            if row is not None:
                return False
            tenant.create_time.CopyFrom(_now())
            await transaction.execute(
                "INSERT INTO tenants (tenant_id, tenant) VALUES (?, ?)",
                (tenant.tenant_id, tenant.SerializeToString()),
            )
        return True

    async def list_tenants(self) -> list[admin_pb2.Tenant]:
        rows = await self._db.fetchall("SELECT tenant FROM tenants ORDER BY tenant_id")
        return [admin_pb2.Tenant.FromString(row[0]) for row in rows]

    async def disable_tenant(self, tenant_id: str) -> admin_pb2.Tenant | None:
        async with self._db.transaction() as transaction:
            await transaction.lock(f"tenant:{tenant_id}")
            row = await transaction.fetchone("SELECT tenant FROM tenants WHERE tenant_id = ?", (tenant_id,))
            if row is None:
                return None
            tenant = admin_pb2.Tenant.FromString(row[0])
            tenant.disabled = True
            await transaction.execute(
                "UPDATE tenants SET tenant = ? WHERE tenant_id = ?", (tenant.SerializeToString(), tenant_id)
            )
        return tenant

    # Keys -----------------------------------------------------------------------------------------

    async def create_key(self, key: admin_pb2.ApiKey, secret: str, ttl_micros: int | None = None) -> None:
        """Stores a new key (only its secret's hash); ttl_micros: it expires that long after now."""
        key.prefix = key_prefix(key.key_id)
        key.create_time.CopyFrom(_now())
        if ttl_micros is not None:
            key.expire_time.FromMicroseconds(key.create_time.ToMicroseconds() + ttl_micros)
        async with self._db.transaction() as transaction:
            await transaction.execute(
                "INSERT INTO api_keys (key_id, tenant_id, secret_sha256, api_key) VALUES (?, ?, ?, ?)",
                (key.key_id, key.tenant_id, _sha256(secret), key.SerializeToString()),
            )

    async def list_keys(self, tenant_id: str, prefix: str) -> list[admin_pb2.ApiKey]:
        rows = await self._db.fetchall(
            "SELECT api_key FROM api_keys WHERE (? = '' OR tenant_id = ?) ORDER BY key_id",
            (tenant_id, tenant_id),
        )
        keys = [admin_pb2.ApiKey.FromString(row[0]) for row in rows]
        keys = [key for key in keys if key.prefix.startswith(prefix)]
        return sorted(keys, key=lambda key: (key.create_time.seconds, key.create_time.nanos, key.key_id))

    async def revoke_key(self, key_id: str) -> admin_pb2.ApiKey | None:
        """Revokes the key (its id, or its prefix); the key as it is now, None if unknown."""
        key_id = key_id.removeprefix("aiprod_")
        async with self._db.transaction() as transaction:
            await transaction.lock(f"api-key:{key_id}")
            row = await transaction.fetchone("SELECT api_key FROM api_keys WHERE key_id = ?", (key_id,))
            if row is None:
                return None
            key = admin_pb2.ApiKey.FromString(row[0])
            if not key.HasField("revoke_time"):
                key.revoke_time.CopyFrom(_now())
                await transaction.execute(
                    "UPDATE api_keys SET api_key = ? WHERE key_id = ?", (key.SerializeToString(), key_id)
                )
        return key

    async def match(self, secret: str) -> KeyMatch | None:
        """The key and tenant a presented secret proves, or None when it proves nothing (malformed,
        unknown, or not the key's secret). Revocation, expiry and disabling are the caller's to judge."""
        parsed = _KEY.fullmatch(secret)
        key_id = parsed.group(1) if parsed else ""
        row = None
        if parsed:
            row = await self._db.fetchone(
                "SELECT k.secret_sha256, k.api_key, t.tenant FROM api_keys k"
                " JOIN tenants t ON t.tenant_id = k.tenant_id WHERE k.key_id = ?",
                (key_id,),
            )
        stored = row[0] if row else _NO_HASH
        if not hmac.compare_digest(_sha256(secret), stored) or row is None:
            return None
        return KeyMatch(admin_pb2.ApiKey.FromString(row[1]), admin_pb2.Tenant.FromString(row[2]))
