"""pytest plugin (-p tools.nbval_timing): each notebook's smoke-mode wall time at the end of an nbval run (budget: 180 s)."""
from __future__ import annotations

import time
from collections import defaultdict

import pytest

BUDGET_S = 180
_seconds: dict[str, float] = defaultdict(float)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    start = time.perf_counter()
    yield
    _seconds[item.path.name] += time.perf_counter() - start


def pytest_terminal_summary(terminalreporter) -> None:
    if not _seconds:
        return
    terminalreporter.section("notebook wall time (smoke)")
    for name, seconds in sorted(_seconds.items()):
        flag = "" if seconds <= BUDGET_S else f"  OVER the {BUDGET_S} s budget"
        terminalreporter.write_line(f"{name:40s} {seconds:7.1f} s{flag}")
