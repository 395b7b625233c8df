"""`aiprod budget` against the real metrics service."""

import json
from collections.abc import Iterator

import pytest
from cli_support import aiprod

from aiprod_kit.mesh import Mesh


@pytest.fixture(scope="module")
def metrics_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    mesh = Mesh(
        tmp_path_factory.mktemp("budget"), free_ports=True, only=("metrics",),
        environment={"AIPROD_METRICS_DAILY_CAP_USD": "25"},
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


def test_budget_table_and_an_unreachable_service(metrics_address):
    table = aiprod("budget", "--metrics", metrics_address)
    assert table.returncode == 0, table.stderr
    assert "global" in table.stdout
    assert "25.00" in table.stdout
    away = aiprod("budget", "--metrics", "127.0.0.1:1")
    assert away.returncode == 2
    assert "metrics service" in away.stderr
