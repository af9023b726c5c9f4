"""``celery_fleet.contrib.litellm.FleetHook``: the real LiteLLM against ProviderSim.

``litellm.callbacks = [FleetHook(fleet, ...)]`` must hold a slot around each
``litellm.completion`` (threads) and ``litellm.acompletion`` (asyncio): a herd gets no
provider 429, the in-flight cap holds at the simulator, reservations are settled from the
response's ``usage``, a provider 429 pauses the limit, the release comes before the call
returns (not from LiteLLM's logging thread), and a call that never reports its end gives
its slot back after ``max_hold``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
os.environ.setdefault("LITELLM_TELEMETRY", "False")
litellm = pytest.importorskip("litellm")
from litellm.integrations.custom_logger import CustomLogger  # noqa: E402

from celery_fleet import CircuitOpen, ConfigError, Fleet, Throttled  # noqa: E402
from celery_fleet.contrib.litellm import FleetHook  # noqa: E402
from celery_fleet.testing import ProviderSim  # noqa: E402
from tests.litellm_lists import kept  # noqa: E402

MakeFleet = Callable[..., Fleet]
pytestmark = [
    # LiteLLM's own models and SDK glue, not ours (pydantic on its TypedDicts)
    pytest.mark.filterwarnings("ignore:.*ReadOnly.*qualifier:UserWarning"),
    # the connections of the HTTP clients LiteLLM caches per thread, open when a test ends
    pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning"
    ),
]
MESSAGES = [{"role": "user", "content": "summarise the fleet's limits"}]
#: 100 tokens a second: a day window whose refill during a test is a few hundred tokens.
DAY_TOKENS = 8_640_000
MS_PER_TOKEN = 86_400_000 / DAY_TOKENS


@pytest.fixture(autouse=True)
def _callbacks() -> Iterator[None]:
    """Each test sets ``litellm.callbacks``; put the global lists back afterwards."""
    with kept(litellm):
        yield


def _install(*hooks: CustomLogger) -> None:
    litellm.callbacks = list(hooks)


def _kw(sim: ProviderSim, **extra: Any) -> dict[str, Any]:
    return dict(
        model="openai/sim",
        api_base=sim.base_url,
        api_key="x",
        num_retries=0,
        messages=MESSAGES,
        max_tokens=200,
        **extra,
    )


def _herd_fleet(make_fleet: MakeFleet) -> Fleet:
    return make_fleet(
        {
            "sim": {
                "max_in_flight": 4,
                "rpm": 600,
                "burst": 5 / 600,
                "tokens": f"{DAY_TOKENS}/day",
            }
        },
        max_wait=120,
    )


def _tokens_ahead_ms(fleet: Fleet) -> float:
    """How far the day window's bucket runs ahead of now (ms): what it has charged."""
    store = fleet.admission.store
    tat = float(store.call("HGET", fleet.admission.keys("sim").ctl, "t:86400"))
    now_s, now_us = store.call("TIME")
    return tat - (int(now_s) * 1000 + int(now_us) / 1000)


def _check_herd(
    fleet: Fleet, hook: FleetHook, sim: ProviderSim, used: list[int], t0: float
) -> None:
    stats = sim.stats()
    assert stats["ok"] == 40 and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] <= 4, stats
    assert hook.holding == [] and fleet.admission.in_flight("sim") == 0
    # Settled from usage: the window charged what the responses report, not the estimates
    # (40 x 207); the bucket has refilled at most the test's own duration since.
    charged_ms = sum(used) * MS_PER_TOKEN
    elapsed_ms = (time.monotonic() - t0) * 1000
    ahead = _tokens_ahead_ms(fleet)
    assert charged_ms - elapsed_ms - 50 <= ahead <= charged_ms + 50, (ahead, charged_ms)


def test_a_thread_herd_of_completions_gets_no_429_and_the_cap_holds(
    make_fleet: MakeFleet,
) -> None:
    fleet = _herd_fleet(make_fleet)
    hook = FleetHook(fleet, limit="sim")
    _install(hook)
    with ProviderSim(rpm=600, tpm=None, max_in_flight=4, latency=0.05, burst_s=1.0) as sim:

        def call(_: int) -> int:
            return int(litellm.completion(**_kw(sim)).usage.total_tokens)

        t0 = time.monotonic()
        with ThreadPoolExecutor(40) as pool:
            used = list(pool.map(call, range(40)))
        _check_herd(fleet, hook, sim, used, t0)
    hook.close()


def test_an_asyncio_herd_of_acompletions_gets_no_429_and_the_cap_holds(
    make_fleet: MakeFleet,
) -> None:
    fleet = _herd_fleet(make_fleet)
    hook = FleetHook(fleet, limit={"openai/sim": "sim"})
    _install(hook)
    with ProviderSim(rpm=600, tpm=None, max_in_flight=4, latency=0.05, burst_s=1.0) as sim:

        async def main() -> list[int]:
            async def call() -> int:
                return int((await litellm.acompletion(**_kw(sim))).usage.total_tokens)

            try:
                return list(await asyncio.gather(*(call() for _ in range(40))))
            finally:
                await fleet.aclose()

        t0 = time.monotonic()
        used = asyncio.run(main())
        _check_herd(fleet, hook, sim, used, t0)
    hook.close()


def test_a_provider_429_pauses_the_limit_sync_and_async(
    make_fleet: MakeFleet, namespace: str
) -> None:
    for mode in ("sync", "async"):
        fleet = make_fleet({"sim": {"rpm": 600}}, max_wait=0, namespace=f"{namespace}-{mode}")
        _install(FleetHook(fleet, limit="sim"))
        with ProviderSim(rpm=6, tpm=None, burst_s=10, latency=0.0) as sim:  # one request
            # Another app on the same API key spends it: the fleet has had no warning.
            httpx.post(f"{sim.base_url}/chat/completions", json={"messages": MESSAGES})
            if mode == "sync":
                with pytest.raises(litellm.RateLimitError):
                    litellm.completion(**_kw(sim))
            else:

                async def main(fleet: Fleet = fleet) -> None:
                    try:
                        with pytest.raises(litellm.RateLimitError):
                            await litellm.acompletion(**_kw(sim))
                    finally:
                        await fleet.aclose()

                asyncio.run(main())
            decision = fleet.try_acquire("sim")
            assert not decision.allowed and decision.reason == "paused", (mode, decision)
            assert decision.wait_ms > 5000  # the sim's "try again in ~10 s"
            assert sim.stats()["requests"] == 2


class _SlowLogger(CustomLogger):
    """A logger ahead of the hook whose success logging blocks until told to go on."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def log_success_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self.go.wait(30)

    async def async_log_success_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.go.wait, 30)


def test_the_slot_is_released_before_the_call_returns_not_by_the_logging_thread(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"sim": {"max_in_flight": 1, "rpm": 600}}, max_wait=5)
    slow, hook = _SlowLogger(), FleetHook(fleet, limit="sim")
    _install(slow, hook)  # success logging is stuck behind the slow logger
    try:
        with ProviderSim(rpm=600, tpm=None, max_in_flight=1, latency=0.0) as sim:
            litellm.completion(**_kw(sim))
            assert hook.holding == [] and fleet.admission.in_flight("sim") == 0

            async def main() -> None:
                try:
                    await litellm.acompletion(**_kw(sim))
                    assert hook.holding == [] and fleet.admission.in_flight("sim") == 0
                finally:
                    slow.go.set()
                    await fleet.aclose()

            asyncio.run(main())
    finally:
        slow.go.set()
        hook.close()


def test_completion_blocks_until_admitted_and_acompletion_is_refused(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"sim": {"max_in_flight": 1, "rpm": 600}}, max_wait=0)
    hook = FleetHook(fleet, limit="sim")
    _install(hook)
    with ProviderSim(rpm=600, tpm=None, latency=0.0) as sim:
        holder = fleet.slot("sim").acquire()  # the cap is full

        async def refused() -> None:
            try:
                await litellm.acompletion(**_kw(sim))
            finally:
                await fleet.aclose()

        with pytest.raises(Throttled):  # the async path can refuse: max_wait=0
            asyncio.run(refused())
        # The sync path cannot (LiteLLM swallows what log_pre_api_call raises): it waits.
        done: list[Any] = []
        caller = threading.Thread(target=lambda: done.append(litellm.completion(**_kw(sim))))
        caller.start()
        _until(lambda: len(fleet.line("sim")) == 1)  # in line, not at the provider
        assert sim.stats()["requests"] == 0 and not done
        holder.release()
        caller.join(30)
        assert len(done) == 1 and sim.stats()["ok"] == 1
    hook.close()


def test_completion_waits_out_an_open_breaker_and_acompletion_is_refused(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"sim": {"rpm": 600, "breaker": {"reset_timeout": 1}}}, max_wait=0)
    refusals: list[str] = []
    fleet.admission.watchers.append(
        lambda event, limit, fields: (
            refusals.append(fields["reason"]) if event == "refused" else None
        )
    )
    hook = FleetHook(fleet, limit="sim")
    _install(hook)
    with ProviderSim(rpm=600, tpm=None, latency=0.0) as sim:
        fleet.breaker("sim").force_open()

        async def refused() -> None:
            try:
                await litellm.acompletion(**_kw(sim))
            finally:
                await fleet.aclose()

        with pytest.raises(CircuitOpen):
            asyncio.run(refused())
        done: list[Any] = []
        caller = threading.Thread(target=lambda: done.append(litellm.completion(**_kw(sim))))
        caller.start()
        _until(lambda: refusals.count("circuit_open") >= 3)  # refused, asked again, refused
        assert sim.stats()["requests"] == 0 and not done
        fleet.breaker("sim").unforce()
        caller.join(30)
        assert len(done) == 1 and sim.stats()["ok"] == 1
    hook.close()


def test_a_router_is_covered_on_both_paths(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"sim": {"max_in_flight": 1, "rpm": 600}}, max_wait=0)
    hook = FleetHook(fleet, limit={"openai/sim": "sim"})
    _install(hook)
    with ProviderSim(rpm=600, tpm=None, latency=0.0) as sim:
        params = {"model": "openai/sim", "api_base": sim.base_url, "api_key": "x"}
        router = litellm.Router(
            model_list=[{"model_name": "agent", "litellm_params": params}], num_retries=0
        )
        assert router.completion(model="agent", messages=MESSAGES).usage.total_tokens > 0
        holder = fleet.slot("sim").acquire()  # the cap is full

        async def main() -> None:
            try:
                with pytest.raises(Throttled):
                    await router.acompletion(model="agent", messages=MESSAGES)
                holder.release()
                await router.acompletion(model="agent", messages=MESSAGES)
            finally:
                await fleet.aclose()

        asyncio.run(main())
        assert sim.stats()["ok"] == 2 and hook.holding == []
        assert fleet.admission.in_flight("sim") == 0
    hook.close()


class _Abort(BaseException):
    """What a gevent ``Timeout`` or a ``KeyboardInterrupt`` is: not an ``Exception``."""


class _AbortAfterAdmission(CustomLogger):
    def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
        raise _Abort  # passes LiteLLM's ``except Exception``: no failure event follows


def test_a_call_that_never_reports_its_end_is_released_after_max_hold(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"sim": {"max_in_flight": 2, "rpm": 600}}, max_wait=5)
    hook = FleetHook(fleet, limit="sim", max_hold=0.5)
    _install(hook, _AbortAfterAdmission())
    with ProviderSim(rpm=600, tpm=None, latency=0.0) as sim:
        with pytest.raises(_Abort):
            litellm.completion(**_kw(sim))
        assert sim.stats()["requests"] == 0
        assert len(hook.holding) == 1 and fleet.admission.in_flight("sim") == 1
        _until(lambda: hook.holding == [] and fleet.admission.in_flight("sim") == 0)
    hook.close()


def test_a_cancelled_acompletion_gives_its_slot_back_when_its_task_ends(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"sim": {"max_in_flight": 2, "rpm": 600}}, max_wait=5)
    hook = FleetHook(fleet, limit="sim")  # max_hold 900 s: only the task's end can release
    _install(hook)
    with ProviderSim(rpm=600, tpm=None, latency=5.0, latency_sigma=0.0) as sim:

        async def main() -> None:
            try:
                call = asyncio.ensure_future(litellm.acompletion(**_kw(sim)))
                while sim.stats()["requests"] == 0:  # at the provider, holding its slot
                    await asyncio.sleep(0.01)
                assert len(hook.holding) == 1
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
            finally:
                await fleet.aclose()

        asyncio.run(main())
        _until(lambda: hook.holding == [] and fleet.admission.in_flight("sim") == 0)
    hook.close()


def test_bad_arguments_are_config_errors_naming_them(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"sim": {"rpm": 600}, "big": {"tpm": 60_000}})
    with pytest.raises(ConfigError, match="unknown limit 'nope'"):
        FleetHook(fleet, limit="nope")
    with pytest.raises(ConfigError, match="unknown limit 'nope'"):
        FleetHook(fleet, limit={"openai/sim": "nope"})
    with pytest.raises(ConfigError, match="limit must be"):
        FleetHook(fleet, limit=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_hold"):
        FleetHook(fleet, limit="sim", max_hold=0)
    with pytest.raises(ConfigError, match="no token budget"):
        FleetHook(fleet, limit="sim", tokens=100)
    with pytest.raises(ConfigError, match="max_wait"):
        FleetHook(fleet, limit="sim", max_wait=-1)


def test_which_limit_a_model_draws_on(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"sim": {"rpm": 600}, "big": {"tpm": 60_000}})
    mapped = FleetHook(fleet, limit={"openai/sim": "sim", "gpt-4o": "big"})
    assert mapped.limit_for("sim", "openai") == "sim"
    assert mapped.limit_for("openai/sim") == "sim"
    assert mapped.limit_for("gpt-4o", "azure") == "big"
    assert mapped.limit_for("other", "openai") is None  # passes through
    assert FleetHook(fleet, limit={"*": "big"}).limit_for("x", "y") == "big"
    chosen = FleetHook(fleet, limit=lambda model: "big" if model.startswith("openai/") else None)
    assert chosen.limit_for("sim", "openai") == "big" and chosen.limit_for("m", "x") is None
    assert mapped.tokens_for("sim", {"messages": MESSAGES, "max_tokens": 50}) == 0  # no budget
    assert mapped.tokens_for("big", {"messages": MESSAGES, "max_tokens": 50}) == 57
    wrong = FleetHook(fleet, limit=lambda model: "nope")
    with pytest.raises(ConfigError, match="unknown limit 'nope'"):
        wrong.limit_for("sim", "openai")


@pytest.mark.parametrize(
    "limits",
    [
        {"openai": {"max_in_flight": 1, "rpm": 600}},  # the fleet's only limit
        {"openai": {"max_in_flight": 1, "rpm": 600}, "other": {"rpm": 60}},  # the provider's
    ],
    ids=["one-limit", "named-like-the-provider"],
)
def test_fleethook_without_limit_as_the_issue_writes_it(
    make_fleet: MakeFleet, limits: dict[str, Any]
) -> None:
    """``litellm.callbacks = [FleetHook(fleet)]``, verbatim: 8 threads against a provider
    allowing 1 in flight get no 429, so each call held a slot of ``openai``."""
    fleet = make_fleet(limits, max_wait=30)
    hook = FleetHook(fleet)
    litellm.callbacks = [hook]
    with ProviderSim(rpm=None, tpm=None, max_in_flight=1, latency=0.05) as sim:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: litellm.completion(**_kw(sim)), range(8)))
        stats = sim.stats()
    assert stats["ok"] == 8 and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] == 1, stats
    assert hook.holding == [] and fleet.admission.in_flight("openai") == 0


def test_without_limit_several_limits_pick_by_provider_or_ask_for_limit(
    make_fleet: MakeFleet, caplog: pytest.LogCaptureFixture
) -> None:
    one = FleetHook(make_fleet({"sim": {"rpm": 600}}))
    assert one.limit == "sim" and one.limit_for("gpt-4o", "azure") == "sim"
    fleet = make_fleet({"openai": {"rpm": 600}, "anthropic": {"rpm": 600}, "misc": {"rpm": 6}})
    hook = FleetHook(fleet)
    assert hook.limit_for("gpt-4o", "openai") == "openai"
    assert hook.limit_for("anthropic/claude-sonnet-4-5") == "anthropic"
    assert hook.limit_for("claude-sonnet-4-5") == "anthropic"  # LiteLLM names the provider
    with caplog.at_level("WARNING", logger="celery_fleet"):
        assert hook.limit_for("gemini-pro", "gemini") is None  # no such limit: passes through
        assert hook.limit_for("gemini-flash", "gemini") is None
    warned = [r for r in caplog.records if "no limit named 'gemini'" in r.getMessage()]
    assert len(warned) == 1  # once per provider
    with pytest.raises(ConfigError, match=r"none is named like a LiteLLM provider: big, sim;"):
        FleetHook(make_fleet({"sim": {"rpm": 600}, "big": {"tpm": 60_000}}))
    with pytest.raises(ConfigError, match="pass limit="):
        FleetHook(make_fleet({"sim": {"rpm": 600}, "big": {"tpm": 60_000}}))


def _until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_does_not_inherit_the_parents_held_calls(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"sim": {"max_in_flight": 2, "rpm": 600}}, max_wait=5)
    hook = FleetHook(fleet, limit="sim", max_hold=60)
    hook.calls.hold("parent-call", fleet.slot("sim").acquire())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a prefork worker's process
        try:
            hook.calls.hold("child-call", hook.calls.get("parent-call").slot)  # type: ignore[union-attr]
            alive = hook.calls._sweeper is not None and hook.calls._sweeper.is_alive()
            os.write(write, f"{hook.holding}|{alive}".encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    told = os.read(read, 200).decode()
    os.close(read)
    os.close(write)
    # the parent's call is not the child's to release after max_hold; its own sweeper runs
    assert told == "['child-call']|True"
    assert hook.holding == ["parent-call"]
    held = hook.calls.take("parent-call", asyncio_slot=False)
    assert held is not None
    held.blocking.release()
    hook.close()
