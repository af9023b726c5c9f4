"""The chaos suite, short: each scenario with its CI parameters (``suite.py``).

Real workers, private redis-servers, the provider simulator; each scenario prints its
figures (run pytest with ``-s`` to see them) and fails when a check does, naming the
issue-20 defects it depends on. ``make chaos`` runs the long version
(``benchmarks/chaos.py``). Counts are asserted (exactly once, leaks, cap), never speeds.
"""

from __future__ import annotations

import pytest

from .suite import SCENARIOS

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str) -> None:
    scenario = SCENARIOS[name]
    figures = scenario.run(scenario.short)
    print("\n" + figures.report())
    assert figures.passed, (
        f"{name} failed: {'; '.join(figures.failures)} "
        f"(depends on issue-20 defects: {scenario.depends_on})"
    )
