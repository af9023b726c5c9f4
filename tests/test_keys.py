"""Keys (tenants) of a limit on a real Redis: each key's sub-limit checked in the same
acquire as the limit's, all or nothing; key state that expires when idle; keys validated
before any Redis call. Fair share between keys: tests/test_fair_share.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_fleet import ConfigError, Fleet
from celery_fleet.admission.tenancy import key_hash

LIMIT = "llm"


def _ctl(r: redis.Redis, namespace: str) -> dict[bytes, bytes]:
    return r.hgetall(f"{{{namespace}:{LIMIT}}}:ctl")  # type: ignore[return-value]


def test_key_sub_limit_refuses_while_the_limit_has_room_and_consumes_nothing(
    make_fleet: Callable[..., Fleet], rclient: redis.Redis, namespace: str
) -> None:
    fleet = make_fleet(
        {LIMIT: {"rpm": 6000, "max_in_flight": 50, "keys": {"max_in_flight": 2, "rpm": 600}}}
    )
    held = [fleet.try_acquire(LIMIT, key="acme") for _ in range(2)]
    assert all(held)
    before = _ctl(rclient, namespace)
    refused = fleet.try_acquire(LIMIT, key="acme")
    assert not refused and refused.reason == "key_in_flight"
    # nothing consumed: the limit's windows and leases are as before the refusal
    assert _ctl(rclient, namespace) == before
    assert fleet.admission.in_flight(LIMIT) == 2
    # another key still has room (the limit is far from its cap)
    other = fleet.try_acquire(LIMIT, key="globex")
    assert other
    # a release frees the key's own slot
    fleet.release(held[0])
    again = fleet.try_acquire(LIMIT, key="acme")
    assert again, again
    for d in (held[1], other, again):
        fleet.release(d)
    assert fleet.admission.in_flight(LIMIT) == 0


def test_key_window_refuses_with_its_own_reason(make_fleet: Callable[..., Fleet]) -> None:
    # a key bucket of 2 requests (burst 1.0), the limit's far larger
    fleet = make_fleet({LIMIT: {"rpm": 6000, "keys": {"rpm": 2, "burst": 1.0}}})
    assert fleet.try_acquire(LIMIT, key="acme")
    assert fleet.try_acquire(LIMIT, key="acme")
    refused = fleet.try_acquire(LIMIT, key="acme")
    assert not refused and refused.reason == "key requests/60s" and refused.wait_ms > 1000
    assert fleet.try_acquire(LIMIT, key="globex")


def test_limit_refusal_consumes_nothing_of_the_key(
    make_fleet: Callable[..., Fleet], rclient: redis.Redis, namespace: str
) -> None:
    fleet = make_fleet({LIMIT: {"max_in_flight": 1, "keys": {"rpm": 600, "max_in_flight": 5}}})
    first = fleet.try_acquire(LIMIT, key="globex")
    assert first
    kctl = f"{{{namespace}:{LIMIT}}}:k:{key_hash('acme')}:ctl"
    kleases = f"{{{namespace}:{LIMIT}}}:k:{key_hash('acme')}:leases"
    refused = fleet.try_acquire(LIMIT, key="acme")
    assert not refused and refused.reason == "in_flight"
    assert rclient.hget(kctl, "r:60") is None  # the key's window was not charged
    assert rclient.zcard(kleases) == 0
    fleet.release(first)
    admitted = fleet.try_acquire(LIMIT, key="acme")
    assert admitted
    assert rclient.hget(kctl, "r:60") is not None and rclient.zcard(kleases) == 1
    fleet.release(admitted)
    assert rclient.zcard(kleases) == 0  # the release left the key's semaphore too


def test_slot_with_a_key_renews_and_settles_the_keys_state(
    make_fleet: Callable[..., Fleet], rclient: redis.Redis, namespace: str
) -> None:
    fleet = make_fleet(
        {LIMIT: {"tpm": 100_000, "keys": {"tpm": 10_000, "max_in_flight": 3}, "lease": 2}}
    )
    kctl = f"{{{namespace}:{LIMIT}}}:k:{key_hash('acme')}:ctl"
    kleases = f"{{{namespace}:{LIMIT}}}:k:{key_hash('acme')}:leases"
    with fleet.slot(LIMIT, tokens=900, key="acme") as slot:
        assert slot.key == "acme" and slot.lease_id is not None
        charged = float(rclient.hget(kctl, "t:60") or 0)
        slot.settle(tokens=100)  # a refund of 800 tokens in the key's window too
        refunded = float(rclient.hget(kctl, "t:60") or 0)
        assert refunded < charged - 800 * 6000 / 10_000 * 0.9
        expiry = rclient.zscore(kleases, slot.lease_id)
        slot.ensure_held()  # a renewal: the key's lease moves forward too
        assert (rclient.zscore(kleases, slot.lease_id) or 0) > (expiry or 0)
    assert rclient.zcard(kleases) == 0


def test_idle_keys_leave_no_redis_keys_behind(
    make_fleet: Callable[..., Fleet], rclient: redis.Redis, namespace: str
) -> None:
    fleet = make_fleet(
        {
            LIMIT: {
                "rate": "100000/second",
                "lease": 1,
                "keys": {"rate": "5/second", "max_in_flight": 2},
            }
        }
    )
    n = 10_000
    for i in range(n):
        d = fleet.try_acquire(LIMIT, key=f"tenant-{i}")
        assert d, d
        fleet.release(d)
    keys = list(rclient.scan_iter(match=f"{{{namespace}:{LIMIT}}}:k:*", count=5000))
    # each key's ctl lives about its longest window (1 s) plus a margin: the first ones
    # are already gone while the loop runs
    assert keys and all(rclient.pttl(k) != -1 and rclient.pttl(k) <= 3000 for k in keys[:200])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = list(rclient.scan_iter(match=f"{{{namespace}:{LIMIT}}}:k:*", count=5000))
        if not left:
            break
        time.sleep(0.5)
    assert left == []


@pytest.mark.parametrize("key", ["", "a\nb", "x" * 257, 42, "tab\there", b"bytes"], ids=repr)
def test_a_bad_key_is_a_config_error_before_redis(
    key: Any, make_fleet: Callable[..., Fleet]
) -> None:
    fleet = make_fleet({LIMIT: {"rpm": 60, "keys": {"rpm": 10}}}, redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="key"):
        fleet.slot(LIMIT, key=key)
    with pytest.raises(ConfigError, match="key"):
        fleet.try_acquire(LIMIT, key=key)


def test_a_key_on_a_limit_without_keys_is_a_config_error(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet({LIMIT: {"rpm": 60}}, redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="has no keys"):
        fleet.slot(LIMIT, key="acme")


def test_keys_and_weights_are_validated_at_start() -> None:
    from celery_fleet.admission.config import parse_limits

    with pytest.raises(ConfigError, match="unknown option"):
        parse_limits({LIMIT: {"rpm": 60, "keys": {"rpm": 10, "breaker": {}}}})
    with pytest.raises(ConfigError, match=r"\['weights'\]\['acme'\]"):
        parse_limits({LIMIT: {"rpm": 60, "weights": {"acme": 0}}})
    with pytest.raises(ConfigError, match="weights"):
        parse_limits({LIMIT: {"rpm": 60, "weights": ["acme"]}})
    cfg = parse_limits({LIMIT: {"rpm": 60, "weights": {"acme": 3}}})[LIMIT]
    assert cfg.keyed and cfg.keys is None and cfg.weights is not None
    assert cfg.weights.weight("acme") == 3 and cfg.weights.weight("other") == 1


def test_status_shows_the_busiest_keys_in_one_read(make_fleet: Callable[..., Fleet]) -> None:
    from celery_fleet.observability.cli import _table
    from celery_fleet.observability.status import KeyStatus, limit_status

    fleet = make_fleet({LIMIT: {"max_in_flight": 4, "keys": {"max_in_flight": 3}}})
    held = [fleet.try_acquire(LIMIT, key="acme") for _ in range(2)]
    held += [fleet.try_acquire(LIMIT, key="globex"), fleet.try_acquire(LIMIT)]
    assert all(held)
    adm = fleet.admission
    waiter = adm.try_acquire(LIMIT, 0, adm.new_ticket(LIMIT, "acme"), join=True)
    assert not waiter and waiter.reason == "in_flight"
    status = limit_status(fleet, LIMIT)
    assert status.keys == [
        KeyStatus("acme", 2, 1),
        KeyStatus("", 1, 0),
        KeyStatus("globex", 1, 0),
    ]
    table = _table([status])
    assert "acme" in table and "2 in flight, 1 in line" in table
    assert status.as_dict()["keys"][0] == {"key": "acme", "in_flight": 2, "waiting": 1}
    for d in held:
        fleet.release(d)


def test_aslot_and_atry_acquire_take_a_key(
    make_fleet: Callable[..., Fleet], rclient: redis.Redis, namespace: str
) -> None:
    import asyncio

    fleet = make_fleet({LIMIT: {"max_in_flight": 5, "keys": {"max_in_flight": 1}}})
    kleases = f"{{{namespace}:{LIMIT}}}:k:{key_hash('acme')}:leases"

    async def main() -> None:
        async with fleet.aslot(LIMIT, key="acme") as slot:
            assert slot.key == "acme" and rclient.zcard(kleases) == 1
            refused = await fleet.atry_acquire(LIMIT, key="acme")
            assert not refused and refused.reason == "key_in_flight"
        assert rclient.zcard(kleases) == 0
        await fleet.aclose()

    asyncio.run(main())


def test_keys_forgotten_by_the_process_lru_still_release_and_ask_again(
    make_fleet: Callable[..., Fleet],
    rclient: redis.Redis,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery_fleet.admission import keyed

    monkeypatch.setattr(keyed, "PACKS_KEPT", 1)
    monkeypatch.setattr(keyed, "NAMES_KEPT", 1)
    fleet = make_fleet({LIMIT: {"max_in_flight": 5, "keys": {"max_in_flight": 1}}})
    a = fleet.try_acquire(LIMIT, key="acme")
    b = fleet.try_acquire(LIMIT, key="globex")  # "acme" is forgotten by this process now
    assert a and b
    fleet.release(a)  # found from the lease alone
    assert rclient.zcard(f"{{{namespace}:{LIMIT}}}:k:{key_hash('acme')}:leases") == 0
    again = fleet.try_acquire(LIMIT, key="acme")
    assert again
    for d in (b, again):
        fleet.release(d)
