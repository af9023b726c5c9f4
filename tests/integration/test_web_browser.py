"""The fleet page in a real headless Chromium (selenium), served by a real
``celery -A ... fleet web`` process while a real ``celery worker`` holds slots.

Skipped only when Chromium or chromedriver is absent (Debian: ``apt-get install chromium
chromium-driver``; ``.ci/run`` installs them; ``CHROMIUM`` and ``CHROMEDRIVER`` name other
paths). With ``FLEET_WEB_SCREENSHOT=docs/fleet-web.png`` the first test also saves the
page as the docs show it.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benchmarks.harness.herd import close_app, stop_processes
from celery_fleet import Fleet
from celery_fleet.observability.web import FleetPage
from celery_fleet.testing.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
#: A private Redis the second test stops and starts again (the task's port range).
PRIVATE_PORT = 7172
MODEL = 'section[data-limit="model"] .in-flight'
WAITING = 'section[data-limit="model"] .waiting .v'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(
            f"no Chromium/chromedriver at {', '.join(missing)}: apt-get install chromium "
            "chromium-driver (or set CHROMIUM and CHROMEDRIVER)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-background-networking", "--disable-extensions", "--no-first-run",
                "--window-size=1300,760", "--hide-scrollbars"):  # fmt: skip
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def text_becomes(driver: Any, css: str, want: str, timeout: float = 30.0) -> None:
    """Wait until the element ``css`` shows ``want`` (the page polls once per interval)."""
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d: Any) -> bool:
        try:
            return bool(d.find_element(By.CSS_SELECTOR, css).text == want)
        except WebDriverException:  # not rendered yet, or re-rendered under us
            return False

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.1).until(shown)
    except TimeoutException:
        seen = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"{css} never showed {want!r}; the page showed:\n{seen}") from None


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def web_app(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """tests/integration/web_app.py with a namespace and queue of this test's own, imported
    afresh here (the worker and the page import it in their own processes)."""
    run = uuid.uuid4().hex[:10]
    monkeypatch.setenv("FLEET_WEB_REDIS", redis_url)
    monkeypatch.setenv("FLEET_WEB_NS", f"web-{run}")
    monkeypatch.setenv("FLEET_WEB_QUEUE", f"fleet-web-{run}")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    sys.modules.pop("tests.integration.web_app", None)
    module = importlib.import_module("tests.integration.web_app")
    yield module
    close_app(module.app)
    client = module._probe
    for k in [*client.scan_iter(match=f"*web-{run}*"), f"fleet-web-{run}"]:
        client.delete(k)
    client.close()


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m celery -A tests.integration.web_app <args>``, output to ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.integration.web_app", *args],
            cwd=ROOT, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def test_the_page_shows_in_flight_live_as_a_worker_takes_and_releases_slots(
    browser: Any, web_app: ModuleType, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    queue = os.environ["FLEET_WEB_QUEUE"]
    worker = start(["worker", "-P", "threads", "-c", "4", "-Q", queue, "-n", f"{queue}@%h",
                    "--without-gossip", "--without-mingle", "--without-heartbeat"],
                   tmp_path / "worker.log")  # fmt: skip
    page = start(["fleet", "web", "--port", "0", "--interval", "0.5"], tmp_path / "web.log")
    held = web_app._probe
    # With FLEET_WEB_SCREENSHOT, a few seconds between steps draw steps in the sparklines.
    shot = os.environ.get("FLEET_WEB_SCREENSHOT")
    pause = (lambda: time.sleep(3)) if shot else (lambda: None)
    try:
        log = tmp_path / "web.log"
        line = wait_for("the page's URL", lambda: "http://" in log.read_text() and log.read_text())
        url = "http://" + line.split("http://", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:"), line
        browser.get(url)
        text_becomes(browser, MODEL, "0/3")
        odd = 'section[data-limit="embed/v3@eu+b.2"]'
        assert browser.find_element(By.CSS_SELECTOR, f"{odd} h2").text == "embed/v3@eu+b.2"
        for n in (1, 2, 3):  # each slot the worker takes shows up
            web_app.hold.delay()
            text_becomes(browser, MODEL, f"{n}/3")
            pause()
        web_app.hold.delay()  # a fourth task waits in line for a slot
        text_becomes(browser, WAITING, "1 waiting")
        model = browser.find_element(By.CSS_SELECTOR, 'section[data-limit="model"]').text
        assert "breaker\nclosed" in model and "of 600 requests/60s" in model, model
        if shot:
            pause()
            browser.save_screenshot(str(ROOT / shot))
        held.lpush(web_app.key("release"), 1)  # one ends: the one in line takes its slot
        text_becomes(browser, WAITING, "0 waiting")
        assert browser.find_element(By.CSS_SELECTOR, MODEL).text == "3/3"
        held.lpush(web_app.key("release"), 1)
        text_becomes(browser, MODEL, "2/3")
        held.lpush(web_app.key("release"), 1, 1)
        text_becomes(browser, MODEL, "0/3")
        assert page.poll() is None and worker.poll() is None
    finally:
        held.lpush(web_app.key("release"), *range(4))
        stop_processes(page, worker)  # by pid: the processes this test started


def test_the_page_says_redis_unreachable_and_recovers(
    browser: Any, make_fleet: Callable[..., Fleet]
) -> None:
    from selenium.webdriver.common.by import By

    server = RedisServer(port=PRIVATE_PORT).start()
    try:
        fleet = make_fleet({"llm": {"max_in_flight": 5}}, redis_url=server.url + "/0")
        fleet.try_acquire("llm")
        with FleetPage(fleet, port=0, interval_s=0.3).start() as page:
            browser.get(page.url)
            llm = 'section[data-limit="llm"] .in-flight'
            text_becomes(browser, llm, "1/5")
            server.stop()
            wait_for(
                "the banner",
                lambda: browser.find_element(By.ID, "conn").text.startswith("Redis unreachable"),
            )
            conn = browser.find_element(By.ID, "conn").text
            assert "cannot reach Redis" in conn, conn
            assert "stale" in browser.find_element(By.ID, "limits").get_attribute("class")
            text_becomes(browser, llm, "1/5")  # the last reading, dimmed
            server = RedisServer(port=PRIVATE_PORT).start()  # an empty Redis: no lease
            text_becomes(browser, llm, "0/5")
            assert browser.find_element(By.ID, "conn").text.startswith("live, read at")
    finally:
        server.stop()
