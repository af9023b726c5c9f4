"""Screenshots of Flower showing celery-fleet's data (docs/flower-*.png).

Starts a real ``celery worker -E -P threads -c 4`` and a real ``celery flower`` on free
ports, against the Redis at ``redis://127.0.0.1:6379/7`` (broker, result backend and fleet
state; **the script flushes DB 7 before and after**). It holds the ``gate`` limit shut
from here (``Fleet(app).try_acquire("gate")``) so a ``gate`` task is refused and
rescheduled (THROTTLED) a few times, runs a few ``model`` tasks to completion and keeps
three long ones in flight (3/3), then drives headless Chromium (selenium) to save:

- ``docs/flower-worker-fleet.png``: the worker page, "Other" tab: a ``fleet: <limit>``
  row per limit (one line of its state, from ``celery_fleet.observability.metrics.InfoStep``);
- ``docs/flower-task-throttled.png``: the throttled task's page (its ``task-throttled``
  event's "THROTTLED: ..." exception).

Needs Chromium and chromedriver (Debian: ``apt-get install chromium chromium-driver``) and
``pip install selenium flower``. Run from the repository root::

    .venv/bin/python docs/screenshots.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from celery_fleet import Fleet, fleet_task
from celery_fleet.observability.status import fleet_status
from celery_fleet.testing.redis_server import free_port

REDIS_URL = "redis://127.0.0.1:6379/7"
NAMESPACE = "fleet-docs"
QUEUE = "fleet-docs"
NODE = "fleet-docs"
DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

app = Celery("fleet_docs", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    fleet_redis_url=REDIS_URL,
    fleet_namespace=NAMESPACE,
    fleet_limits={"model": {"rpm": 600, "max_in_flight": 3}, "gate": {"max_in_flight": 1}},
    fleet_max_countdown=2.0,  # a refused task comes back within 2 s
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)


@fleet_task(app=app, name="screenshots.call_gate", limit="gate", max_wait=0)
def call_gate(doc: str) -> str:
    """Needs the only slot of "gate" (held shut by the script): rescheduled meanwhile."""
    return f"gated {doc}"


@fleet_task(app=app, name="screenshots.call_model", limit="model")
def call_model(prompt: str, hold_s: float = 0.3) -> str:
    """A paid call under "model" (600 rpm, 3 in flight), ``hold_s`` long."""
    time.sleep(hold_s)
    return prompt.upper()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy (exceptions count as not yet)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:  # still starting
            pass
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def start(args: list[str], log: Any, **env: str) -> subprocess.Popen[bytes]:
    """``python -m celery -A screenshots <args>``: this module, imported from docs/."""
    path = os.pathsep.join([str(DOCS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "screenshots", *args],
        cwd=DOCS, env={**os.environ, "PYTHONPATH": path, **env},
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1400,1000", "--hide-scrollbars"):  # fmt: skip
        opts.add_argument(arg)
    opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    service = Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=opts, service=service)


def shoot(flower: str, node: str, task_id: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(f"{flower}/worker/{node}")
        wait.until(ec.element_to_be_clickable((By.ID, "worker-tab-other"))).click()
        pane = wait.until(ec.visibility_of_element_located((By.ID, "tab-other")))
        wait.until(lambda _: "show" in (pane.get_attribute("class") or "").split())
        time.sleep(0.5)  # Bootstrap's fade-in
        assert "fleet: gate" in pane.text and "in flight" in pane.text, pane.text[:500]
        driver.save_screenshot(str(DOCS / "flower-worker-fleet.png"))

        driver.get(f"{flower}/task/{task_id}")
        page = wait.until(ec.visibility_of_element_located((By.ID, "task-page")))
        assert "THROTTLED" in page.text, page.text[:500]
        height, chrome = driver.execute_script(  # the whole page, in the viewport
            "return [document.documentElement.scrollHeight,"
            " window.outerHeight - window.innerHeight]"
        )
        driver.set_window_size(1400, max(1000, int(height) + int(chrome) + 8))
        time.sleep(0.5)
        driver.save_screenshot(str(DOCS / "flower-task-throttled.png"))
    finally:
        driver.quit()


def main() -> None:
    db = redis.Redis.from_url(REDIS_URL)
    db.flushdb()
    log = tempfile.NamedTemporaryFile("w", prefix="fleet-docs-", suffix=".log", delete=False)  # noqa: SIM115
    procs: list[subprocess.Popen[bytes]] = []
    fleet = Fleet(app)
    held, ok = None, False
    try:
        node = f"{NODE}@{socket.gethostname()}"
        procs.append(start(["worker", "-E", "-P", "threads", "-c", "4", "-n", f"{NODE}@%h",
                            "-Q", QUEUE, "-l", "INFO"], log))  # fmt: skip
        port = free_port()
        procs.append(start(["flower", f"--port={port}", "--address=127.0.0.1",
                            "--inspect_timeout=5000"], log,
                           FLOWER_UNAUTHENTICATED_API="true"))  # fmt: skip
        flower = f"http://127.0.0.1:{port}"
        wait_for("the worker", lambda: app.control.inspect(timeout=1, destination=[node]).ping())
        wait_for("Flower", lambda: urllib.request.urlopen(f"{flower}/healthcheck", timeout=2))
        time.sleep(2)  # Flower's event receiver connects

        held = fleet.try_acquire("gate")
        assert held.allowed, held
        gated = call_gate.delay("report-42")
        results = [call_model.delay(f"prompt {i}") for i in range(6)]
        print("model results:", [r.get(timeout=60) for r in results])
        wait_for("3 reschedules", lambda: (gated.info or {}).get("reschedules", 0) >= 3
                 if gated.state == "THROTTLED" else False)  # fmt: skip
        print("gate task:", gated.id, gated.state, gated.info)
        busy = [call_model.delay(f"long {i}", 6.0) for i in range(3)]  # model: 3/3 in flight
        wait_for("3 model calls in flight",
                 lambda: fleet_status(fleet, ["model"])[0].in_flight == 3)  # fmt: skip
        shoot(flower, node, gated.id)
        print("wrote", DOCS / "flower-worker-fleet.png", DOCS / "flower-task-throttled.png")
        print("long model calls:", [r.get(timeout=60) for r in busy])

        fleet.release(held)
        held = None
        print("gate task after release:", gated.get(timeout=30))
        ok = True
    finally:
        if held is not None:
            fleet.release(held)
        for proc in procs:  # by pid: the ones we started
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        if ok:
            os.unlink(log.name)
        else:
            print("worker and Flower logs:", log.name)
        app.close()
        db.flushdb()
        db.close()


if __name__ == "__main__":
    main()
