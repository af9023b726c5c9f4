"""The script specs (store/specs.py) against the .lua files, and the read-only peek."""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import resources
from typing import Any

import pytest
import redis

from celery_fleet import Fleet
from celery_fleet.admission.decision import acquire_args
from celery_fleet.observability.status import OLDEST_SCAN, limit_status
from celery_fleet.store.specs import IDEMPOTENT, LEAVE, PEEK, SPECS
from celery_fleet.store.sync import script_source

SCRIPTS = resources.files("celery_fleet.store.scripts")


def _header(text: str) -> str:
    """The comment block a script starts with."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_spec_names_the_keys_its_script_header_names_in_order(name: str) -> None:
    spec = SPECS[name]
    header = _header(SCRIPTS.joinpath(f"{spec.path}.lua").read_text("utf-8"))
    named = re.findall(r"^-- KEYS\[(\d+)\]\s+(\w+)", header, re.MULTILINE)
    if not named:  # ledger_renew, affinity_homes: "KEYS[i]", one per claim / queue
        assert spec.keys in (("*ledgers",), ("*homes",)) and "KEYS[i]" in header
        return
    assert [int(n) for n, _ in named] == list(range(1, len(named) + 1))
    fixed = tuple(key for key in spec.keys if key[:1] != "*")
    assert tuple(key for _, key in named[: len(fixed)]) == fixed
    # a last "*keys" (a limit with keys: the key's own state) is named after the fixed ones
    assert (len(named) > len(fixed)) == (len(fixed) < len(spec.keys))
    assert "Reply" in header


def test_every_script_file_has_a_spec_and_every_part_is_included() -> None:
    files = {
        f"{folder.name}/{f.name[:-4]}"
        for folder in SCRIPTS.iterdir()
        if folder.is_dir() and not folder.name.startswith("_")
        for f in folder.iterdir()
        if f.name.endswith(".lua")
    }
    assert files == {spec.path for spec in SPECS.values()}
    sources = [script_source(name) for name in SPECS]
    assert not any("\n--#include" in text for text in sources)
    for part in SCRIPTS.joinpath("_lib").iterdir():
        first = part.read_text("utf-8").splitlines()[0]
        assert any(first in text for text in sources), f"_lib/{part.name} is included nowhere"


def test_a_call_of_the_wrong_shape_fails_before_redis() -> None:
    with pytest.raises(TypeError, match="leave"):
        LEAVE.call(["line", "waiting"], ["ticket", 1, 2])
    with pytest.raises(TypeError, match="leave"):
        LEAVE.call(["line", "waiting", "wake"], ["ticket", 1])
    call = LEAVE.call(["line", "waiting", "wake"], ["ticket", 1, 2])
    assert (call.script, call.keys) == ("leave", ["line", "waiting", "wake"])


def test_idempotent_scripts_are_the_ones_a_resend_cannot_double() -> None:
    # acquire charges a budget on every run: its resend is a marked retry, never blind
    assert "acquire" not in IDEMPOTENT and "charge" not in IDEMPOTENT
    assert {"release", "leave", "settle", "renew", "observe"} <= IDEMPOTENT


LIMITS = {
    "llm": {
        "requests": "60/minute",
        "tokens": "6000/minute",
        "max_in_flight": 5,
        "adaptive": True,
        "initial_in_flight": 5,
        "breaker": True,
    }
}


def _snapshot(client: redis.Redis, namespace: str) -> dict[bytes, tuple[Any, Any]]:
    """Every key of the namespace: its serialized value and when it expires (absolute ms
    from Redis 7 on, so a TTL set again to the same length shows; -1 for none)."""
    modern = int(client.info("server")["redis_version"].split(".")[0]) >= 7
    keys = sorted(client.scan_iter(match=f"{{{namespace}*", count=1000))
    return {
        key: (client.dump(key), client.execute_command("PEXPIRETIME", key) if modern else None)
        for key in keys
    }


def test_peek_writes_nothing(
    make_fleet: Callable[..., Fleet], rclient: redis.Redis, namespace: str
) -> None:
    fleet = make_fleet(LIMITS)
    held = [fleet.try_acquire("llm", tokens=100) for _ in range(5)]
    assert all(held)
    fleet.admission.settle("llm", held[0].lease_id or "", actual=50, reserved=100)
    fleet.admission.release("llm", held[1].lease_id or "", "fail", retry_after_ms=60_000)
    assert not fleet.admission.try_acquire("llm", tokens=100, join=True)  # a ticket in line
    fleet.breaker("llm").trip()
    before = _snapshot(rclient, namespace)
    assert len(before) >= 5  # ctl, leases, settled, line, waiting, breaker...

    status = limit_status(fleet, "llm")
    assert status.in_flight == 4 and status.waiting == 1 and status.breaker == "open"
    assert status.paused_s > 0
    assert _snapshot(rclient, namespace) == before

    if int(rclient.info("server")["redis_version"].split(".")[0]) >= 7:
        # A read-only call refuses any write command the script would make.
        keys = PEEK.keys_of(fleet.admission.keys("llm"))
        sha = rclient.script_load(script_source("peek"))
        args = [OLDEST_SCAN, *acquire_args(fleet.admission.limit("llm"))]
        assert rclient.evalsha_ro(sha, len(keys), *keys, *args)
        assert _snapshot(rclient, namespace) == before


def test_status_left_is_what_admission_then_admits(make_fleet: Callable[..., Fleet]) -> None:
    # a day's window refills 0.035 tokens/s: the loop below cannot see a refill
    fleet = make_fleet({"llm": {"requests": "100000/day", "tokens": "3000/day"}})
    assert fleet.try_acquire("llm", tokens=120)
    windows = {w.window: w.left for w in limit_status(fleet, "llm").windows}
    tokens_left = windows["3000 tokens/86400s"]
    assert 0 < tokens_left < 300
    admitted = 0
    while fleet.try_acquire("llm", tokens=1):
        admitted += 1
        assert admitted <= tokens_left + 1
    assert admitted == tokens_left
