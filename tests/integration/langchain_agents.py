"""One process of agents calling a real ChatOpenAI through FleetRateLimiter.

Run by tests/integration/test_langchain_processes.py, twice at once:
``python -m tests.integration.langchain_agents REDIS_URL NAMESPACE BASE_URL CALLS``.
Prints ``ready`` once built, waits for a line on stdin (so both processes start their
calls together), makes CALLS calls from 4 threads and prints ``{"ok": n, "failed": n}``.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

from langchain_openai import ChatOpenAI

from celery_fleet import FOREVER, Fleet
from celery_fleet.contrib.langchain import FleetRateLimiter

#: 10 requests a second fleet-wide, one at a time from a full bucket.
LIMITS = {"openai": {"requests": "10/second", "burst": 0.1}}


def main(redis_url: str, namespace: str, base_url: str, calls: int) -> None:
    fleet = Fleet(limits=LIMITS, redis_url=redis_url, namespace=namespace)
    limiter = FleetRateLimiter(fleet, "openai", max_wait=FOREVER)
    model = ChatOpenAI(
        model="sim", base_url=base_url, api_key="x", max_retries=0, rate_limiter=limiter
    )
    print("ready", flush=True)
    sys.stdin.readline()

    def call(i: int) -> bool:
        try:
            model.invoke(f"question {i}")
        except Exception:  # a 429 from the provider: what the test counts
            return False
        return True

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(calls)))
    print(json.dumps({"ok": sum(results), "failed": results.count(False)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
