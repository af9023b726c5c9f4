"""What a slot does for the quality breaker: judge its answer, count the verdict, route.

:class:`Judging` is a part of :class:`~celery_fleet.admission.slot.Slot` (a mixin): it runs
the detectors of :mod:`celery_fleet.quality` on the call's answer (``judge``), hands the
verdict's count to the release (``quality_command``; the release writes both at once), and
decides which limit the slot is admitted against while the asked limit's quality breaker
is open (``routed``/``route``: ``pause`` raises ``QualityDegraded``, ``fallback`` moves the
slot to the other limit).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, FleetError, QualityDegraded
from ..quality.config import DETECTOR_NAMES
from ..quality.judge import Verdict, ask_of, judge
from ..store.calls import PackedCalls, Steps
from .decision import Decision
from .lanes import check_lane
from .providers import Signal

if TYPE_CHECKING:
    from .core import Admission, Release

__all__ = [
    "Judging",
    "judge_answer",
    "release_judged_steps",
    "outcome_of",
    "check_verdict",
    "sync_hook",
    "await_hook",
    "route_ask",
]

log = logging.getLogger("celery_fleet")


def judge_answer(
    admission: Admission,
    limit: str,
    resp: Any,
    ask: Any,
    validate: Callable[[Any], object] | None,
    asked: str | None = None,
) -> Verdict:
    """Judge ``resp`` with the detectors of ``limit`` (or of ``asked``, the limit asked for
    when a fallback admitted it elsewhere) and learn its length; tell the watchers."""
    quality = admission.quality
    cfg = quality.config(limit) or (quality.config(asked) if asked else None)
    names = cfg.detectors if cfg is not None else DETECTOR_NAMES
    verdict = judge(resp, names, ask, validate, quality.lengths(limit))
    if admission.watchers:
        said = "ok" if verdict.ok else "garbage"
        admission.tell("judged", limit, verdict=said, reasons=verdict.reasons)
    return verdict


def check_verdict(verdict: object) -> Verdict | None:
    """``verdict`` if it is a :class:`Verdict` (or None); anything else is refused."""
    if verdict is None or isinstance(verdict, Verdict):
        return verdict
    raise ConfigError(
        f"verdict must be the Verdict fleet.judge() returned, got {type(verdict).__name__}"
    )


def sync_hook(hook: Callable[[Any], object] | None) -> Callable[[Any], object] | None:
    """``hook`` for a blocking judge: a coroutine it returns cannot be awaited there, so it
    is closed and judges nothing (``await fleet.ajudge(...)`` awaits it), with a warning."""
    if hook is None:
        return None

    def run(resp: Any) -> object:
        answer = hook(resp)
        if inspect.isawaitable(answer):
            if hasattr(answer, "close"):
                answer.close()
            log.warning("celery-fleet: an async validate hook needs await fleet.ajudge(...)")
            return True
        return answer

    return run


async def await_hook(hook: Callable[[Any], object] | None, resp: Any) -> bool | None:
    """Run ``hook`` on ``resp`` (awaited if it is a coroutine function): whether it accepts
    the answer (an exception: no), None without a hook."""
    if hook is None:
        return None
    try:
        answer = hook(resp)
        return bool(await answer) if inspect.isawaitable(answer) else bool(answer)
    except Exception:
        return False


def route_ask(
    admission: Admission,
    name: str,
    tokens: int,
    key: str | None,
    lane: str | None,
    decide: Callable[[], str] | None = None,
) -> tuple[str, int, str | None, str | None] | Decision:
    """Where the quality breaker sends a ``try_acquire`` of ``name``: ``(limit, tokens, key,
    lane)`` to ask (the limit itself, or its fallback while its breaker is open, as a slot
    is moved), or a refused :class:`Decision` (``reason="quality_degraded"``, ``wait_ms``
    until it half-opens) with ``pause``. ``decide``: an awaited caller's, after its read."""
    cfg = admission.quality.config(name)
    tokens = admission.limit(name).check_tokens(tokens)
    if cfg is None or not cfg.gates:
        return name, tokens, key, lane
    admission.new_ticket(name, key, lane)  # the key and lane asked are checked either way
    try:
        target = decide() if decide else admission.quality.route(name)
    except QualityDegraded as exc:
        if admission.watchers:
            admission.tell("refused", name, reason=exc.reason, wait_ms=exc.wait_ms)
        return Decision(name, False, exc.wait_ms, None, exc.reason, 0, tokens, 0.0)
    if target == name:
        return name, tokens, key, lane
    other = admission.limit(target)
    try:
        chosen = check_lane(other.lanes, target, lane)
    except ConfigError:
        chosen = check_lane(other.lanes, target, None)
    lane = chosen.name if chosen is not None else None
    return target, min(tokens, other.max_tokens_per_call or 0), key if other.keyed else None, lane


def outcome_of(outcome: str, verdict: Verdict | None) -> str:
    """The release outcome a verdict leaves: ``validate`` rejecting the answer turns an
    ``ok`` into the availability breaker's failure (as on a slot); garbage alone does not."""
    if verdict is not None and verdict.invalid and outcome == "ok":
        return Signal("invalid_output").outcome
    return outcome


def release_judged_steps(
    admission: Admission, name: str, lease_id: str, outcome: str, verdict: Verdict | None
) -> Steps[Release]:
    """The release of ``lease_id`` with ``verdict`` counted by ``name``'s quality breaker in
    the same round trip (``fleet.release(decision, verdict=...)``); without a verdict, or
    on a limit without ``quality``, the release alone. A lease the store-down policy
    lent is released locally and its verdict dropped (Redis is away)."""
    counted = admission.quality.count_command(name, verdict) if verdict is not None else None
    if counted is None or admission.store_down.owns(lease_id):
        return (yield from admission.release_steps(name, lease_id, outcome))
    command = admission.release_command(name, lease_id, outcome, clock=True)
    reply, count = yield PackedCalls((command, counted))
    admission.quality.counted(name, count)
    return admission.released(name, reply)


class Judging:
    """The quality side of a slot (see the module docstring)."""

    admission: Admission
    #: the limit admitted against, and the one asked for (they differ on a fallback)
    limit: str
    asked: str
    lane: str | None
    key: str | None
    tokens: int
    validator: Callable[[Any], object] | None
    verdict: Signal | None
    #: the verdict of :meth:`judge`, counted by the quality breaker on release
    judged: Verdict | None
    _asked_lane_key: tuple[str | None, str | None]

    def routed(self, decide: Callable[[], str] | None = None) -> str:
        """Where the quality breaker sends this slot (``decide``: AsyncSlot's, after an
        awaited read); a ``QualityDegraded`` refusal is told to the watchers first."""
        try:
            return decide() if decide else self.admission.quality.route(self.asked)
        except QualityDegraded as exc:
            if self.admission.watchers:
                self.admission.tell("refused", self.asked, reason=exc.reason, wait_ms=exc.wait_ms)
            raise

    def route(self, limit: str) -> None:
        """Be admitted against ``limit``: the one asked for, or its quality fallback (the
        lane and key asked for when that limit has them, and at most the tokens it admits)."""
        if limit == self.limit:
            return
        cfg = self.admission.limit(limit)
        lane, key = self._asked_lane_key
        self.limit = limit
        try:
            chosen = check_lane(cfg.lanes, limit, lane)
        except ConfigError:
            chosen = check_lane(cfg.lanes, limit, None)
        self.lane = chosen.name if chosen is not None else None
        self.key = key if cfg.keyed else None
        self.tokens = min(self.tokens, cfg.max_tokens_per_call or 0)

    def judge(
        self,
        resp: Any,
        *,
        max_tokens: int | None = None,
        json: bool = False,
        response_format: Any = None,
        schema: Any = None,
        request: Any = None,
    ) -> Verdict:
        """Judge a call's answer (OpenAI/Anthropic response, SDK object or dict) for garbage.

        Runs the limit's detectors (``quality["detectors"]``, all by default) and its
        ``validate`` hook; ``max_tokens``, ``json``/``response_format`` and ``schema`` (or
        ``request``, the call's body, that has them) say what was asked. The verdict is
        counted by the limit's quality breaker when the slot is released (in the same
        write: no round trip of its own). Only ``validate`` rejecting it counts as a
        failure of the availability breaker, as :meth:`validate` does. Never raises.
        """
        verdict = self.judge_with(
            resp, self.validator, ask_of(max_tokens, json, response_format, schema, request)
        )
        if verdict.invalid:
            self.verdict = Signal("invalid_output", detail="validate() rejected the result")
        return verdict

    def judge_with(self, resp: Any, validate: Callable[[Any], object] | None, ask: Any) -> Verdict:
        """:meth:`judge` with the hook given (AsyncSlot passes an awaited answer)."""
        self.judged = judge_answer(self.admission, self.limit, resp, ask, validate, self.asked)
        return self.judged

    def quality_command(self) -> tuple[str, bytes] | None:
        """The count of the verdict :meth:`judge` gave, once (None: nothing to count)."""
        verdict, self.judged = self.judged, None
        if verdict is None:
            return None
        return self.admission.quality.count_command(self.limit, verdict)

    def _post_count(self) -> None:
        """Post the judged verdict's count (``next``: the release rides on the next ask)."""
        counted = self.quality_command()
        if counted is None:
            return
        limit, quality = self.limit, self.admission.quality
        try:
            if not self.admission.store.post(counted, lambda r: quality.counted(limit, r)):
                (reply,) = self.admission.store.send(counted)
                quality.counted(limit, reply)
        except FleetError as exc:
            quality.counted(limit, exc)
