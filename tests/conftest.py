"""Shared test setup: where the offline data lives, and helpers that skip cleanly without it.

``DS_SOO_DATA`` defaults to ``../shared/data`` next to the repository; ``--data-path DIR`` overrides
both. Tests that need a data file skip with the missing path in the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--data-path",
        default=None,
        help="directory with the shared data files (default: $DS_SOO_DATA, else ../shared/data)",
    )


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--data-path")
    if path:
        os.environ["DS_SOO_DATA"] = str(Path(path).resolve())
    else:
        os.environ.setdefault("DS_SOO_DATA", str(DEFAULT_DATA))


@pytest.fixture
def data_dir() -> Path:
    return Path(os.environ["DS_SOO_DATA"])


@pytest.fixture
def require_data(data_dir: Path):
    """``require_data("tinyshakespeare.txt")`` -> the file's path, or skip naming what is missing."""

    def need(name: str) -> Path:
        path = data_dir / name
        if not path.is_file():
            pytest.skip(f"{path} not found (set DS_SOO_DATA or pass --data-path)")
        return path

    return need


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons: reset them around a test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
