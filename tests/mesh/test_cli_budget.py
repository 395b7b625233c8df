"""`aiprod budget` against the real metrics service."""

import json
from collections.abc import Iterator

import grpc
import pytest
from helpers.cli import aiprod
from helpers.mesh import eventually

from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_kit.mesh import DEVELOPMENT_TENANT, Mesh
from aiprod_kit.money import usd


@pytest.fixture(scope="module")
def metrics_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Reservations expire within a second, so that a test can make uncertain money.
    mesh = Mesh(
        tmp_path_factory.mktemp("budget"), free_ports=True, only=("metrics",),
        environment={
            "AIPROD_METRICS_DAILY_CAP_USD": "25", "AIPROD_METRICS_RESERVATION_TTL_SECONDS": "1",
            "AIPROD_METRICS_EXPIRY_SWEEP_SECONDS": "0.2",
        },
    )  # fmt: skip
    mesh.start()
    yield mesh.address("metrics")
    mesh.stop()


def test_budget_json_shows_the_tenant_and_the_global_budget(metrics_address):
    shown = aiprod("budget", "--json", "--metrics", metrics_address)
    assert shown.returncode == 0, shown.stderr
    budget = json.loads(shown.stdout)
    assert budget["global"]["cap"]["amount_micros"] == str(25_000_000)
    assert budget["global"]["level"] == "BUDGET_LEVEL_OK"
    assert budget["budget"]["tenant_id"] == "default"
    assert "amount_micros" in budget["global"]["uncertain"]


def test_budget_table_and_an_unreachable_service(metrics_address):
    table = aiprod("budget", "--metrics", metrics_address)
    assert table.returncode == 0, table.stderr
    assert "global" in table.stdout
    assert "25.00" in table.stdout
    away = aiprod("budget", "--metrics", "127.0.0.1:1")
    assert away.returncode == 2
    assert "metrics service" in away.stderr


def test_budget_shows_uncertain_money_on_its_own_line(metrics_address):
    with grpc.insecure_channel(metrics_address) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        stub.ReserveBudget(
            metrics_pb2.ReserveBudgetRequest(reservation_key="job-u:1", job_id="job-u", amount=usd(1_750_000))
        )

        def expired() -> bool:
            return stub.GetBudget(metrics_pb2.GetBudgetRequest()).budget.expired_reservations == 1

        assert eventually(expired)
    shown = json.loads(aiprod("budget", "--json", "--metrics", metrics_address).stdout)
    for budget in (shown["budget"], shown["global"]):
        assert budget["uncertain"]["amount_micros"] == str(1_750_000)
        assert budget["spent"]["amount_micros"] == str(1_750_000)  # counted in spent at its worst case
    table = aiprod("budget", "--metrics", metrics_address)
    assert table.returncode == 0, table.stderr
    (line,) = [line for line in table.stdout.splitlines() if line.startswith("uncertain")]
    assert "tenant default 1.75" in line and "global 1.75" in line


def test_budget_shows_the_api_keys_tenant_unless_told_another(mesh: Mesh):
    where = ("--metrics", mesh.address("metrics"), "--gateway", mesh.address("gateway"))

    mine = aiprod("budget", "--json", *where, api_key=mesh.api_key)
    assert mine.returncode == 0, mine.stderr
    assert json.loads(mine.stdout)["budget"]["tenant_id"] == DEVELOPMENT_TENANT

    other = aiprod("budget", "--json", "--tenant", "acme", *where, api_key=mesh.api_key)
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout)["budget"]["tenant_id"] == "acme"

    refused = aiprod("budget", *where, api_key="not-a-key")
    assert refused.returncode == 2
    assert "UNAUTHENTICATED" in refused.stderr
    assert "not-a-key" not in refused.stderr
