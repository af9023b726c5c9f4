"""The fleet page (``celery fleet web``) over real HTTP (urllib) against a real Redis.

The page in a real browser with a real worker is ``tests/integration/test_web_browser.py``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_fleet import Fleet
from celery_fleet.errors import ConfigError
from celery_fleet.observability.status import fleet_status
from celery_fleet.observability.web import FleetPage
from celery_fleet.testing.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {
    "llm": {"requests": "60/minute", "burst": 10 / 60, "max_in_flight": 5},
    "tool": {"max_in_flight": 4, "breaker": True, "adaptive": True},
}
#: A private Redis this file stops and starts again (the task's port range).
PRIVATE_PORT = 7171


def fetch(
    url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, Any, Message]:
    """(status, body: JSON decoded when it is JSON, headers), also for error statuses."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            status, raw, got = reply.status, reply.read(), reply.headers
    except urllib.error.HTTPError as exc:
        status, raw, got = exc.code, exc.read(), exc.headers
        exc.close()
    body: Any = json.loads(raw) if raw and "json" in got["Content-Type"] else raw.decode()
    return status, body, got


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, Any]:
    status, body, _ = fetch(url, headers, method)
    return status, body


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def fleet(make_fleet: Callable[..., Fleet]) -> Fleet:
    return make_fleet(LIMITS)


@pytest.fixture
def page(fleet: Fleet) -> Iterator[FleetPage]:
    with FleetPage(fleet, port=0, interval_s=0.2).start() as p:
        yield p


def test_the_json_has_the_rows_of_status_json_and_their_history(fleet: Fleet) -> None:
    held = [fleet.try_acquire("llm") for _ in range(3)]
    # One reading an hour: the test makes the readings (start() makes the first)
    with FleetPage(fleet, port=0, interval_s=3600, history_s=3600).start() as page:
        status, doc = get(page.url + "api/status")
        assert status == 200 and doc["ok"] is True and doc["error"] is None
        now = [r.as_dict() for r in fleet_status(fleet)]
        assert [r["limit"] for r in doc["limits"]] == ["llm", "tool"]
        for got, want in zip(doc["limits"], now, strict=True):
            assert set(got) == set(want)
            got.pop("oldest_lease_s"), want.pop("oldest_lease_s")  # ages between two reads
            assert got == want
        assert doc["limits"][0]["in_flight"] == 3 and doc["limits"][0]["cap"] == 5
        for d in held:
            fleet.release(d)
        page.sampler.read_once()
        _, doc = get(page.url + "api/status")
    llm = doc["history"]["limits"]["llm"]
    assert len(doc["history"]["t"]) == len(llm) == 2
    assert [p["in_flight"] for p in llm] == [3, 0] and llm[0]["cap"] == 5
    assert llm[0]["left"] == [7] and llm[0]["full"] == [10]
    assert doc["limits"][0]["in_flight"] == 0


def test_the_last_minute_s_admissions_and_waits_come_from_the_counters(fleet: Fleet) -> None:
    with FleetPage(fleet, port=0, interval_s=3600, history_s=3600).start() as page:
        for _ in range(4):
            with fleet.slot("llm"):
                pass
        fleet.counters.flush()
        page.sampler.read_once()
        _, doc = get(page.url + "api/status")
    llm = doc["activity"]["llm"]
    assert llm["admitted_per_min"] > 0 and llm["mean_wait_s"] is not None
    assert doc["activity"]["tool"]["admitted_per_min"] == 0


def test_the_page_is_one_html_document_with_nothing_from_outside(page: FleetPage) -> None:
    status, html, headers = fetch(page.url)
    assert status == 200 and html.startswith("<!doctype html>")
    assert "http://" not in html.replace('"http://www.w3.org/2000/svg"', "")
    assert "https://" not in html and "src=" not in html
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp
    assert get(page.url + "nope")[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
def test_only_get_is_served(page: FleetPage, method: str) -> None:
    for path in ("", "api/status"):
        status, _, headers = fetch(page.url + path, method=method)
        assert status == 405 and headers["Allow"] == "GET", (method, path)


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_with_auth_every_request_needs_the_user_and_password(fleet: Fleet) -> None:
    with FleetPage(fleet, port=0, auth="ops:s3:cret").start() as page:
        for path in ("", "api/status"):
            status, body, headers = fetch(page.url + path)
            assert status == 401 and "limits" not in body
            assert headers["WWW-Authenticate"].startswith("Basic ")
            assert get(page.url + path, _basic("ops", "wrong"))[0] == 401
            assert get(page.url + path, {"Authorization": "Basic !!notbase64"})[0] == 401
            assert get(page.url + path, _basic("ops", "s3:cret"))[0] == 200
        assert get(page.url + "api/status", _basic("ops", "s3:cret"))[1]["ok"] is True


def test_a_foreign_host_name_is_refused_on_loopback(page: FleetPage) -> None:
    """A site that rebinds its DNS name to 127.0.0.1 sends its own name as Host."""
    assert get(page.url + "api/status", {"Host": "evil.example"})[0] == 403
    assert get(page.url + "api/status", {"Host": f"evil.example:{page.port}"})[0] == 403
    assert get(page.url + "api/status", {"Host": f"localhost:{page.port}"})[0] == 200


def _outside_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_command_listens_on_loopback_only_by_default(redis_url: str, tmp_path: Path) -> None:
    """`celery -A ... fleet web --port 0` as an operator runs it: it says where it listens,
    that is 127.0.0.1, and another address of this machine is refused."""
    ns = f"web-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "FLEET_IT_REDIS": redis_url, "FLEET_IT_NS": ns,
           "FLEET_IT_BROKER": redis_url, "PYTHONPATH": str(ROOT)}  # fmt: skip
    out = tmp_path / "web.out"
    with out.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.integration.fleet_app", "fleet", "web",
             "--port", "0", "model"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        line = wait_until("the URL", lambda: "http://" in out.read_text() and out.read_text())
        url = line.split("http://", 1)[1].split()[0]
        host, port = url.rstrip("/").rsplit(":", 1)
        assert host == "127.0.0.1", line
        status, doc = get(f"http://{url}api/status")
        assert status == 200 and [r["limit"] for r in doc["limits"]] == ["model"]
        outside = _outside_address()
        if outside is not None:
            with pytest.raises(OSError):
                socket.create_connection((outside, int(port)), timeout=5).close()
    finally:
        proc.terminate()  # by its pid: the one we started
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"limits": ["nope"]}, "unknown limit(s) ['nope']"),
        ({"auth": "s3cret"}, "auth must be 'user:password', got a value with no ':'"),
        ({"auth": ":s3cret"}, "an empty user"),
        ({"interval_s": 0}, "interval_s must be"),
        ({"interval_s": 2.0, "history_s": 1.0}, "history_s must be"),
    ],
)
def test_bad_arguments_are_config_errors_naming_them(
    fleet: Fleet, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        FleetPage(fleet, port=0, **kwargs)
    assert message in str(caught.value)
    assert "s3cret" not in str(caught.value)  # a password is never echoed


def test_a_port_in_use_is_a_config_error(fleet: Fleet, page: FleetPage) -> None:
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{page.port}"):
        FleetPage(fleet, port=page.port)


def close_clients(fleet: Fleet) -> None:
    """Close ``fleet``'s Redis clients before their private server goes: a socket left to
    the garbage collector warns (an error here) whenever it is collected, even at the end
    of the whole session."""
    for attr in ("_client", "_blocking"):
        client = getattr(fleet.store, attr, None)
        if client is not None:
            client.close()


def test_redis_down_is_a_503_that_the_page_survives_and_recovers_from(
    make_fleet: Callable[..., Fleet],
) -> None:
    server = RedisServer(port=PRIVATE_PORT).start()
    try:
        fleet = make_fleet(LIMITS, redis_url=server.url + "/0")
        held = fleet.try_acquire("llm")
        with FleetPage(fleet, port=0, interval_s=0.2).start() as page:
            assert get(page.url + "api/status")[0] == 200
            server.stop()
            status, doc = wait_until(
                "a 503", lambda: (r := get(page.url + "api/status"))[0] == 503 and r
            )
            assert doc["ok"] is False and "cannot reach Redis" in doc["error"], doc["error"]
            # the last good reading, said to be one: the page shows it dimmed
            assert doc["limits"][0]["in_flight"] == 1 and doc["read_at"] is not None
            assert None in doc["history"]["limits"]["llm"]  # the gap in the sparklines
            assert get(page.url)[0] == 200  # the page itself is still served
            server = RedisServer(port=PRIVATE_PORT).start()  # empty: the lease is gone
            status, doc = wait_until(
                "recovery", lambda: (r := get(page.url + "api/status"))[0] == 200 and r
            )
            assert doc["ok"] is True and doc["limits"][0]["in_flight"] == 0
        del held
        close_clients(fleet)
    finally:
        server.stop()


def test_the_fleet_s_state_is_unchanged_by_the_page(fleet: Fleet, rclient: redis.Redis) -> None:
    """Read-only: watching the page writes no key of the fleet's namespace."""
    fleet_status(fleet)  # the scripts are loaded; nothing else of ours is in Redis yet
    before = sorted(rclient.scan_iter(match=f"{{{fleet.namespace}*"))
    with FleetPage(fleet, port=0, interval_s=0.1).start() as page:
        for _ in range(5):
            assert get(page.url + "api/status")[0] == 200
            get(page.url + "api/status", method="POST")
        page.sampler.read_once()
    assert sorted(rclient.scan_iter(match=f"{{{fleet.namespace}*")) == before


@pytest.mark.parametrize("where", ["option", "environment"])
def test_the_command_refuses_a_bad_auth_without_echoing_it(
    redis_url: str, namespace: str, where: str
) -> None:
    """``--auth`` or ``$CELERY_FLEET_WEB_AUTH``: one line naming it, exit 1, no secret shown."""
    from types import SimpleNamespace

    from celery import Celery
    from click.testing import CliRunner

    from celery_fleet.observability.cli import fleet as fleet_cli

    app = Celery("web_cli_test", broker=redis_url, set_as_current=False)
    app.conf.update(fleet_redis_url=redis_url, fleet_namespace=namespace, fleet_limits=LIMITS)
    # An address nobody has: were the auth accepted, the command would stop here, not serve.
    args, env = ["web", "--port", "0", "--host", "256.0.0.1"], {}
    if where == "option":
        args += ["--auth", "s3cret"]
    else:
        env["CELERY_FLEET_WEB_AUTH"] = "s3cret"
    result = CliRunner().invoke(fleet_cli, args, obj=SimpleNamespace(app=app), env=env)
    assert result.exit_code == 1, result.output
    assert "auth must be 'user:password'" in result.output and "s3cret" not in result.output


def test_a_frozen_redis_is_said_while_the_reading_hangs(redis_url: str, namespace: str) -> None:
    """A Redis that accepts but never answers (SIGSTOP), under health and socket timeouts
    (30 s) longer than the page waits: the page says so without waiting for them, and
    recovers when Redis answers again."""
    from celery import Celery

    server = RedisServer(port=PRIVATE_PORT).start()
    app = Celery("web_frozen", broker=redis_url, set_as_current=False)
    app.conf.update(
        fleet_redis_url=server.url + "/0", fleet_namespace=namespace, fleet_limits=LIMITS,
        fleet_redis_health_timeout=30, fleet_redis_transport_options={"socket_timeout": 30},
    )  # fmt: skip
    assert server.proc is not None
    fleet = Fleet(app)
    try:
        with FleetPage(fleet, port=0, interval_s=0.2).start() as page:
            assert get(page.url + "api/status")[0] == 200
            server.proc.send_signal(signal.SIGSTOP)  # our own redis-server, by its pid
            try:
                status, doc = wait_until(
                    "a 503", lambda: (r := get(page.url + "api/status"))[0] == 503 and r
                )
                assert "no answer from Redis" in doc["error"], doc["error"]
                assert [r["limit"] for r in doc["limits"]] == ["llm", "tool"]
            finally:
                server.proc.send_signal(signal.SIGCONT)
            wait_until("recovery", lambda: get(page.url + "api/status")[0] == 200)
    finally:
        close_clients(fleet)
        server.stop()
        app.close()


# -- lanes, keys and the runtime change in force ------------------------------------------

TENANTS = {
    "tenants": {
        "max_in_flight": 4,
        "weights": {},
        "lanes": {"interactive": {"priority": 0, "reserve": 0.25}, "batch": {"priority": 1}},
    }
}


def _tenants_page(make_fleet: Callable[..., Fleet]) -> tuple[Fleet, list[Any]]:
    """A laned, keyed limit widened at runtime to 8 (batch may hold 6), with acme holding
    2 interactive slots, globex 6 batch slots, and one globex batch caller in line."""
    fleet = make_fleet(TENANTS)
    fleet.set_limit("tenants", max_in_flight=8)
    held = [fleet.try_acquire("tenants", key="acme", lane="interactive") for _ in range(2)]
    held += [fleet.try_acquire("tenants", key="globex", lane="batch") for _ in range(6)]
    assert all(held)
    ticket = fleet.admission.new_ticket("tenants", "globex", "batch")
    assert not fleet.admission.try_acquire("tenants", lease_id=ticket, join=True)
    return fleet, held


def test_the_json_has_each_lane_the_busiest_keys_and_the_runtime_version(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet, _ = _tenants_page(make_fleet)
    version = fleet.admission.runtime.applied("tenants").version
    with FleetPage(fleet, port=0, interval_s=0.2).start() as page:
        doc = wait_until("two readings", lambda: (d := get(page.url + "api/status")[1])
                         and len(d["history"]["t"]) >= 2 and d)  # fmt: skip
    (row,) = doc["limits"]
    assert row["config_version"] == version > 0 and row["config_fields"] == {"max_in_flight": 8}
    lanes = {x["lane"]: x for x in row["lanes"]}
    assert lanes["interactive"] | {"share": 0} == {
        "lane": "interactive", "priority": 0, "share": 0, "in_flight": 2, "waiting": 0,
        "cap": 8, "guarantee": 0.0, "owed": 0,
    }  # fmt: skip
    assert (lanes["batch"]["in_flight"], lanes["batch"]["waiting"]) == (6, 1)
    assert (lanes["batch"]["cap"], lanes["batch"]["owed"]) == (6, 6)  # floor(8 x 0.75)
    keys = {k["key"]: (k["in_flight"], k["waiting"]) for k in row["keys"]}
    assert keys == {"globex": (6, 1), "acme": (2, 0)}
    points = [p for p in doc["history"]["limits"]["tenants"] if p is not None]
    assert points and all(p["lanes"] == [2, 6] for p in points)  # the order of "lanes"


def _readings(page: FleetPage) -> int:
    return len(get(page.url + "api/status")[1]["history"]["t"])


def render_page(page: FleetPage) -> dict[str, Any]:
    """The page's own script run under Node on the page's current JSON: what each card
    shows (tests/fleet_page_dom.js)."""
    import shutil
    import tempfile

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("Node.js is not installed (apt-get install nodejs)")
    _, html = get(page.url)
    _, doc = get(page.url + "api/status")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "page.html").write_text(html)
        (Path(tmp) / "status.json").write_text(json.dumps(doc))
        out = subprocess.run(
            [node, str(ROOT / "tests" / "fleet_page_dom.js"), f"{tmp}/page.html",
             f"{tmp}/status.json"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    rendered: dict[str, Any] = json.loads(out.stdout)
    return rendered


def test_the_page_shows_each_lane_the_busiest_keys_and_the_runtime_version(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet, _ = _tenants_page(make_fleet)
    version = fleet.admission.runtime.applied("tenants").version
    with FleetPage(fleet, port=0, interval_s=0.2).start() as page:
        wait_until("two readings", lambda: _readings(page) >= 2)
        shown = render_page(page)
    (card,) = shown["limits"]
    rows = {r["k"]: r for r in card["rows"]}
    assert rows["lane interactive"]["v"] == "2 in flight / may hold 8, 0 waiting"
    assert rows["lane batch"]["v"] == "6 in flight / may hold 6, owed 6, 1 waiting"
    assert rows["busiest keys"]["items"] == ["globex: 6 in flight, 1 waiting", "acme: 2 in flight"]
    assert rows["runtime"]["v"] == f"v{version} (max_in_flight=8)"
    assert not {"lanes", "keys", "config version", "config fields"} & set(rows)  # no raw JSON
    assert ["in flight by lane", 2] in card["sparks"]  # one line per lane
    assert shown["conn"].startswith("live")


def test_a_limit_as_configured_shows_no_runtime_row(fleet: Fleet, page: FleetPage) -> None:
    wait_until("a reading", lambda: get(page.url + "api/status")[0] == 200)
    shown = render_page(page)
    assert [c["limit"] for c in shown["limits"]] == ["llm", "tool"]
    for card in shown["limits"]:
        keys = {r["k"] for r in card["rows"]}
        assert "runtime" not in keys and "busiest keys" not in keys
        assert not any(k.startswith("lane ") for k in keys)
