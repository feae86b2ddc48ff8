"""The package stays ruff- and mypy-strict-clean and keeps its architecture contract:
checked with every test run, as CI does (mypy and lint-imports run from the session's start,
``tests/early_checks.py``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.early_checks import Finished, tool

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    found = tool(name)
    if found is None:
        pytest.fail(f"{name} is not installed (it is in the [test] extra)")
    return found


def test_ruff_lint_is_clean() -> None:
    result = subprocess.run(
        [_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = subprocess.run(
        [_tool("ruff"), "format", "--check", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.early_check("mypy")
def test_mypy_strict_is_clean(early_check: Finished) -> None:
    assert early_check.returncode == 0, early_check.stdout + early_check.stderr


@pytest.mark.early_check("lint-imports")
def test_the_architecture_contract_holds(early_check: Finished) -> None:
    """The layer order and "domain packages return decisions" ([tool.importlinter])."""
    assert early_check.returncode == 0, early_check.stdout + early_check.stderr
