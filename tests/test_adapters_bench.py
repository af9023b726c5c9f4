"""benchmarks/adapters.py (``make bench-adapters``): its options, and a tiny run of every
adapter plain vs through the fleet that appends nothing."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.litellm_lists import kept

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
os.environ.setdefault("LITELLM_TELEMETRY", "False")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*ReadOnly.*qualifier:UserWarning"),
    pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning"
    ),
]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return importlib.import_module("benchmarks.adapters")


@pytest.fixture(autouse=True)
def _litellm_lists() -> Iterator[None]:
    """The LiteLLM run copies its FleetHook into LiteLLM's global callback lists, where it
    would outlive this test (and its closed fleet): put the lists back afterwards."""
    try:
        import litellm
    except ImportError:
        yield
        return
    with kept(litellm):
        yield


def test_help_and_bad_options(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--threads" in out and "--only" in out and "--no-write" in out
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "nope"])
    assert bench.parse_args([]).adapters == list(bench.ADAPTERS)


def test_a_tiny_run_of_every_adapter_appends_nothing(
    bench: ModuleType, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.results import RESULTS

    before = RESULTS.stat().st_size
    from tests.conftest import TEST_DB

    assert (
        bench.main(["--redis-url", redis_url, "--db", str(TEST_DB), "--threads", "5", "--no-write"])
        == 0
    )
    out = capsys.readouterr().out
    assert RESULTS.stat().st_size == before
    rows = [
        line.split(" | ")
        for line in out.splitlines()
        if line.startswith("| ") and "| fleet |" in line
    ]
    assert len(rows) == len(bench.ADAPTERS), out
    for row in rows:
        completed, provider_429 = row[2], row[3]
        assert completed == "5/5" and provider_429 == "0", row
        assert int(row[4].split()[0]) <= 3, row  # the provider's in-flight cap held
        assert row[-1] == "0 |", row  # nothing left in flight
