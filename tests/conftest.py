"""Fixtures shared by the chart tests."""

from __future__ import annotations

from collections.abc import Iterator

import helm_python
import pytest

from gateway_extproc.render import CHART


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    """The chart loaded once per module (the Helm engine is a shared library call)."""
    c = helm_python.Chart.load(str(CHART))
    try:
        yield c
    finally:
        c.close()
