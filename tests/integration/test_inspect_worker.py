"""``celery inspect fleet`` from a real worker names the task holding each slot.

Three tasks hold a slot of 'model' each (cap 3) until the test releases them: one in its
own thread, one through ``fleet.aslot`` in an async body, one in a thread it starts (no
task runs there). Under ``-P threads`` the answering main process holds them itself;
under prefork its pool processes do, and the reply reads what each recorded in Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

from .test_worker import ROOT, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _held(reply: dict[str, Any]) -> list[dict[str, Any]]:
    """Every slot of 'model' in one worker's reply, wherever the pool holds it."""
    slots = list(reply.get("held") or [])
    for pid_slots in (reply.get("held_in_children") or {}).values():
        slots.extend(pid_slots)
    return [s for s in slots if s.get("limit") == "model"]


@pytest.mark.parametrize("pool", [("threads", "4"), ("prefork", "4")], ids=lambda p: p[0])
def test_inspect_fleet_names_the_task_holding_each_slot(
    redis_url: str, pool: tuple[str, str]
) -> None:
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    with start_worker(redis_url, broker, pool=pool) as fleet_app:
        probe, tag = fleet_app._probe, uuid.uuid4().hex[:8]
        sync = fleet_app.holds_model.delay(tag)
        in_async = fleet_app.holds_model_async.delay(tag)
        in_thread = fleet_app.holds_model_in_a_thread.delay(tag)
        for _ in range(3):  # each task says when its slot is held
            assert probe.blpop([fleet_app.key(f"holding:{tag}")], timeout=60), "not held"
        # prefork: the pool processes record their slots every 2 s; poll until all three
        deadline, slots, reply = time.monotonic() + 30, [], {}
        while len(slots) < 3 and time.monotonic() < deadline:
            replies = fleet_app.app.control.inspect(timeout=2)._request("fleet") or {}
            prefix = fleet_app.worker_prefix
            reply = next((r for h, r in replies.items() if h.startswith(prefix)), {})
            slots = _held(reply)
        try:
            assert reply["pool"] == {"threads": "thread"}.get(pool[0], pool[0])  # its module
            by_task = {s["task_id"]: s for s in slots}
            assert set(by_task) == {sync.id, in_async.id, None}, slots
            assert by_task[sync.id]["task"] == fleet_app.holds_model.name
            assert by_task[in_async.id]["task"] == fleet_app.holds_model_async.name
            assert by_task[None]["holder"] == "no task"
            assert all(s["held_s"] >= 0 and s["lease"] for s in slots)
            if pool[0] == "prefork":  # read from the children's records, their age said
                assert reply["held"] == [] and all("recorded_s_ago" in s for s in slots)
            else:  # the main process holds them: live
                assert len(reply["held"]) == 3
            # as an operator types it: the ids are in the command's output
            done = subprocess.run(
                [sys.executable, "-m", "celery", "-A", "tests.integration.fleet_app",
                 "inspect", "fleet", "--timeout", "10"],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert sync.id in done.stdout and in_async.id in done.stdout
            assert '"no task"' in done.stdout
        finally:
            for how in ("sync", "async", "thread"):
                probe.rpush(fleet_app.key(f"release:{tag}:{how}"), 1)
        assert {r.get(timeout=60) for r in (sync, in_async, in_thread)} == {
            "sync", "async", "thread",
        }  # fmt: skip
