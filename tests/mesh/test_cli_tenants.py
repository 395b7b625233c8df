"""`aiprod admin` (tenants and keys) and `aiprod usage`, run as users do against a real mesh: a tenant
created, given a key shown once, the key listed without its secret, used, revoked (the CLI then gets
UNAUTHENTICATED and says what to do, never printing the key), the tenant disabled; the admin key's own
errors; the tenant's usage."""

import json
import re
import subprocess
import uuid
from datetime import UTC, datetime, timedelta

from helpers.cli import aiprod

from aiprod_kit.mesh import Mesh


def admin(mesh: Mesh, *args: str, admin_key: str | None = None) -> subprocess.CompletedProcess[str]:
    """`aiprod admin ...` against the mesh's gateway with its admin key (or the one given)."""
    return aiprod("admin", *args, "--gateway", mesh.address("gateway"), admin_key=admin_key or mesh.admin_key)


def as_tenant(mesh: Mesh, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    return aiprod(*args, "--gateway", mesh.address("gateway"), api_key=key)


def json_of(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_tenants_and_keys_create_list_use_revoke_and_disable(mesh: Mesh) -> None:
    tenant_id = f"cli-{uuid.uuid4().hex[:8]}"

    created = json_of(
        admin(
            mesh,
            "tenants",
            "create",
            tenant_id,
            "--name",
            "CLI team",
            "--tier",
            "GOLD",
            "--daily-budget",
            "12.5",
            "--json",
        )
    )
    assert created["tenant_id"] == tenant_id
    assert created["tier"] == "SLA_TIER_GOLD"
    assert created["daily_budget"]["amount_micros"] == "12500000"
    again = admin(mesh, "tenants", "create", tenant_id)
    assert again.returncode == 2
    assert "ALREADY_EXISTS" in again.stderr

    listed = admin(mesh, "tenants", "list")
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"^\s*{tenant_id}\s+CLI team\s+gold\s+12\.50 USD\s+enabled\s", listed.stdout, re.M), (
        listed.stdout
    )

    # A new key: its details, then its secret on a line of its own, last, with the warning.
    made = admin(mesh, "keys", "create", tenant_id, "--name", "ci")
    assert made.returncode == 0, made.stderr
    secret_line = made.stdout.splitlines()[-1]
    assert re.fullmatch(r"AIPROD_API_KEY=aiprod_[0-9a-f]+_[\w-]+", secret_line), made.stdout
    key = secret_line.partition("=")[2]
    prefix = "_".join(key.split("_")[:2])
    assert "shown only this once" in made.stderr
    assert key not in made.stderr
    assert re.search(rf"^\s*{prefix}\s+{tenant_id}\s+ci\s+active\s", made.stdout, re.M), made.stdout

    # Listed by prefix, never with the secret.
    keys = admin(mesh, "keys", "list", "--tenant", tenant_id, "--json")
    (listed_key,) = json_of(keys)["keys"]
    assert listed_key["prefix"] == prefix
    assert listed_key["name"] == "ci"
    assert key not in keys.stdout
    table = admin(mesh, "keys", "list", "--prefix", prefix)
    assert re.search(rf"^\s*{prefix}\s+{tenant_id}\s+ci\s+active\s+.+\s+never\s*$", table.stdout, re.M), (
        table.stdout
    )
    assert key not in table.stdout

    # The key works, and sees only its tenant's jobs (none).
    assert json_of(as_tenant(mesh, key, "jobs", "list", "--json"))["jobs"] == []

    revoked = admin(mesh, "keys", "revoke", prefix)
    assert revoked.returncode == 0, revoked.stderr
    assert re.search(rf"^\s*{prefix}\s+{tenant_id}\s+ci\s+revoked\s", revoked.stdout, re.M), revoked.stdout

    refused = as_tenant(mesh, key, "jobs", "list")
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert f"error: UNAUTHENTICATED: the API key {prefix} was revoked" in refused.stderr
    assert "hint: the gateway refused the API key: export AIPROD_API_KEY" in refused.stderr
    assert key not in refused.stderr

    # A key with a lifetime, then the tenant disabled: its keys stop working.
    expiring = json_of(admin(mesh, "keys", "create", tenant_id, "--ttl", "12h", "--json"))
    assert expiring["secret"].startswith(f"aiprod_{expiring['key']['key_id']}_")
    expires = datetime.fromisoformat(expiring["key"]["expire_time"].replace("Z", "+00:00"))
    assert timedelta(hours=11) < expires - datetime.now(UTC) <= timedelta(hours=12)
    assert as_tenant(mesh, expiring["secret"], "presets").returncode == 0

    disabled = json_of(admin(mesh, "tenants", "disable", tenant_id, "--json"))
    assert disabled["disabled"] is True
    denied = as_tenant(mesh, expiring["secret"], "presets")
    assert denied.returncode == 2
    assert "PERMISSION_DENIED" in denied.stderr
    assert expiring["secret"] not in denied.stderr
    assert re.search(rf"^\s*{tenant_id}\s.*\sdisabled\s", admin(mesh, "tenants", "list").stdout, re.M)


def test_admin_needs_the_admin_key(mesh: Mesh) -> None:
    missing = aiprod("admin", "tenants", "list", "--gateway", mesh.address("gateway"), admin_key="")
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [
        "error: no admin key: export AIPROD_ADMIN_KEY=<key> as `aiprod up` prints it (the gateway's "
        "AIPROD_GATEWAY_ADMIN_KEY), or pass --admin-key"
    ]

    wrong = admin(mesh, "keys", "list", admin_key="not-the-admin-key")
    assert wrong.returncode == 2
    assert wrong.stdout == ""
    assert "error: UNAUTHENTICATED" in wrong.stderr
    assert "AIPROD_ADMIN_KEY (or --admin-key) must be the gateway's AIPROD_GATEWAY_ADMIN_KEY" in wrong.stderr
    assert "not-the-admin-key" not in wrong.stderr

    # An API key is not an admin key, nor the other way round.
    assert admin(mesh, "tenants", "list", admin_key=mesh.api_key).returncode == 2
    assert as_tenant(mesh, mesh.admin_key, "jobs", "list").returncode == 2

    bad_ttl = admin(mesh, "keys", "create", "dev", "--ttl", "soon")
    assert bad_ttl.returncode == 2
    assert "--ttl" in bad_ttl.stderr


def test_usage_shows_the_tenants_jobs_and_spend(mesh: Mesh) -> None:
    # A tenant of its own, so that its figures are this test's.
    tenant_id = f"usage-{uuid.uuid4().hex[:8]}"
    key = mesh.create_api_key(tenant_id, name="usage")
    rendered = json_of(as_tenant(mesh, key, "render", "A windmill", "--duration", "1", "--json"))
    assert rendered["state"] == "JOB_STATE_SUCCEEDED"

    usage = json_of(as_tenant(mesh, key, "usage", "--json"))
    assert usage["tenant_id"] == tenant_id
    assert usage["tier"] == "SLA_TIER_GOLD"
    assert {count["state"]: count["count"] for count in usage["jobs"]} == {"JOB_STATE_SUCCEEDED": "1"}
    assert usage["first_day"] == usage["last_day"]
    for field in ("spend_today", "spend_in_range", "reserved", "budget_left", "quoted_total", "actual_total"):
        assert "amount_micros" in usage[field], field

    today = datetime.fromisoformat(usage["first_day"]).date()
    week_ago = (today - timedelta(days=7)).isoformat()
    ranged = json_of(as_tenant(mesh, key, "usage", "--from", week_ago, "--to", today.isoformat(), "--json"))
    assert (ranged["first_day"], ranged["last_day"]) == (week_ago, today.isoformat())

    table = as_tenant(mesh, key, "usage", "--from", week_ago, "--to", today.isoformat())
    assert table.returncode == 0, table.stderr
    rows = {
        "tenant": tenant_id,
        "tier": "gold",
        "jobs": "succeeded 1",
        "approval rate": r"\d+%",
        "spend today": r"[\d.]+ USD",
        f"spend {week_ago} to {today.isoformat()}": r"[\d.]+ USD",
        "reserved": r"[\d.]+ USD",
        "budget left": r"[\d.]+ USD",
        "quoted vs actual": r"[\d.]+ USD quoted, [\d.]+ USD actual",
    }
    for name, value in rows.items():
        assert re.search(rf"^\s*{name}\s+{value}", table.stdout, re.M), (name, table.stdout)

    bad = as_tenant(mesh, key, "usage", "--from", "2024-02-30")
    assert bad.returncode == 2
    assert "--from" in bad.stderr
