"""What the CLI's tables look like where a user reads them: a terminal, or a pipe and a log file."""

import io

import pytest
from rich import box

from aiprod_cli.output import console, new_table

_ROW = ("veo", "serving", "veo-3.0-generate-001 720p", "a note long enough to pass eighty columns on its own")


def _printed(**options: object) -> list[str]:
    out = console(**options)
    table = new_table("backend", "health", "models", "note", box=box.SIMPLE)
    table.add_row(*_ROW)
    out.print(table)
    return out.file.getvalue().splitlines()


def test_a_table_into_a_pipe_keeps_each_row_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)

    lines = _printed(file=io.StringIO())

    row = next(line for line in lines if "veo" in line)
    assert row.split() == [word for cell in _ROW for word in cell.split()]
    # As wide as the table, not padded to the unbounded width.
    assert max(len(line) for line in lines) < 200


def test_a_set_width_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")

    lines = _printed(file=io.StringIO())

    assert max(len(line) for line in lines) <= 60


def test_a_terminal_folds_to_its_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)

    lines = _printed(file=io.StringIO(), force_terminal=True, width=70, color_system=None)

    assert max(len(line) for line in lines) <= 70
    assert not any(line.split() == [w for cell in _ROW for w in cell.split()] for line in lines)
