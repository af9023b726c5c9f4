"""Judging one answer: the built-in detectors, the length baseline, the ``validate`` hook.

:func:`judge` never raises into the caller: a detector (or hook) that raises is logged
once (per detector) and counts as no finding, except the user's ``validate``, whose
exception means "garbage" as it always has.

The output-length baseline (``length_shift``) is kept per process, per limit
(:class:`LengthBaseline`): it is a property of the answers' distribution that every
process samples alike, so a local average converges as well as a shared one would,
and keeping it local adds nothing to the release's round trip or the breaker's hash.

Example::

    verdict = judge(resp, DETECTOR_NAMES, Ask(max_tokens=512, json=True))
    if verdict.garbage:
        print(verdict.reasons)   # ("json",)
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .detectors import DETECTORS, Ask, Reply, read_reply

__all__ = ["Verdict", "LengthBaseline", "judge", "ask_of"]

log = logging.getLogger("celery_fleet")
_logged: set[str] = set()


@dataclass(frozen=True)
class Verdict:
    """What :meth:`Slot.judge <celery_fleet.admission.slot.Slot.judge>` found.

    ``ok`` is True when nothing was found; ``reasons`` names the detectors that fired (and
    ``"validate"`` when the limit's or slot's hook rejected the answer), ``details`` says
    what each found. ``invalid`` is True when ``validate`` rejected it: only that counts
    as a failure of the availability breaker.
    """

    ok: bool
    reasons: tuple[str, ...] = ()
    details: tuple[str, ...] = ()
    invalid: bool = False

    @property
    def garbage(self) -> bool:
        """The opposite of ``ok``: the call succeeded but its output is garbage."""
        return not self.ok

    def __bool__(self) -> bool:
        return self.ok


class LengthBaseline:
    """A per-process rolling baseline of answer lengths (EWMA of log length, and its spread).

    An answer is a shift when, after ``warmup`` answers, its log length is more than
    ``z`` deviations from the mean and at least ``factor`` times shorter or longer.
    """

    def __init__(self, alpha: float = 0.02, warmup: int = 50, z: float = 4.0, factor: float = 3.0):
        self.alpha, self.warmup, self.z, self.factor = alpha, warmup, z, factor
        self.n = 0
        self.mean = 0.0
        self.var = 0.0
        self._lock = threading.Lock()

    def check(self, length: int) -> str | None:
        """The finding for an answer of ``length`` characters (None: within the baseline)."""
        x = math.log1p(length)
        with self._lock:
            if self.n < self.warmup:
                return None
            sd = math.sqrt(self.var) if self.var > 0 else 0.0
            mean = self.mean
        if abs(x - mean) > max(self.z * sd, math.log(self.factor)):
            usual = int(math.expm1(mean))
            return f"{length} characters where about {usual} are usual"
        return None

    def learn(self, length: int, weight: float = 1.0) -> None:
        """Count an answer the other detectors found fine into the baseline (a shifted one
        with a small ``weight``: a lasting change is learnt slowly, a burst hardly)."""
        x = math.log1p(length)
        with self._lock:
            self.n += 1
            a = max(self.alpha, 1.0 / self.n) * weight  # a plain mean until 1/n < alpha
            delta = x - self.mean
            self.mean += a * delta
            self.var = (1 - a) * (self.var + a * delta * delta)


def ask_of(
    max_tokens: int | None = None,
    json: bool = False,
    response_format: Any = None,
    schema: Any = None,
    request: Mapping[str, Any] | None = None,
) -> Ask:
    """An :class:`Ask` from a request's ``max_tokens``, ``json``, ``response_format``
    (OpenAI ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
    {"schema": {...}}}``) and ``schema``; ``request`` (the call's body) gives whichever of
    ``max_tokens``/``max_completion_tokens``/``max_output_tokens`` and ``response_format``
    (a Responses body's ``text={"format": {...}}``) the arguments do not. A pydantic
    model class (as an SDK's ``parse()`` takes) is a schema too."""
    if isinstance(request, Mapping):
        if max_tokens is None:
            found = [request.get(k) for k in _MAX_TOKEN_FIELDS]
            max_tokens = next((v for v in found if isinstance(v, int)), None)
        if response_format is None:
            response_format = request.get("response_format")
        text = request.get("text")  # OpenAI Responses: text={"format": {...}}
        if response_format is None and isinstance(text, Mapping):
            response_format = text.get("format")
    if schema is None and hasattr(response_format, "model_json_schema"):
        schema = _model_schema(response_format)  # a pydantic model class (SDKs' parse())
    if schema is not None and not isinstance(schema, Mapping):
        schema = _model_schema(schema)
    if isinstance(response_format, Mapping):
        kind = response_format.get("type")
        json = json or kind in ("json_object", "json_schema")
        # chat: {"json_schema": {"schema": ...}}; Responses: the schema at the top
        inner = response_format.get("json_schema", response_format)
        if schema is None and kind == "json_schema" and isinstance(inner, Mapping):
            found_schema = inner.get("schema")
            schema = found_schema if isinstance(found_schema, Mapping) else None
    if schema is not None:
        json = True
    valid = isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0
    return Ask(max_tokens if valid else None, bool(json), schema)


def _model_schema(model: Any) -> Mapping[str, Any] | None:
    """The JSON schema of a pydantic model class, or None (nothing else is a schema)."""
    try:
        found = model.model_json_schema()
    except Exception:
        return None
    return found if isinstance(found, Mapping) else None


#: How much a shifted answer weighs in the length baseline against one within it.
SHIFTED_WEIGHT = 0.2

_MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def _run(name: str, detector: Callable[[Reply, Ask], str | None], reply: Reply, ask: Ask) -> Any:
    try:
        return detector(reply, ask)
    except Exception:
        if name not in _logged:
            _logged.add(name)
            log.warning("celery-fleet: quality detector %r raised; ignored", name, exc_info=True)
        return None


def judge(
    resp: Any,
    detectors: Iterable[str],
    ask: Ask,
    validate: Callable[[Any], object] | None = None,
    lengths: LengthBaseline | None = None,
) -> Verdict:
    """Run the named detectors (and ``validate``) on ``resp``; never raises."""
    names = tuple(detectors)
    try:
        reply = read_reply(resp)
    except Exception:  # an answer of a shape nobody foresaw: only validate judges it
        log.debug("celery-fleet: could not read %r as a model answer", type(resp), exc_info=True)
        reply, names = Reply(None), ()
    found: list[tuple[str, str]] = []
    for name in names:
        detector = DETECTORS.get(name)
        detail = _run(name, detector, reply, ask) if detector is not None else None
        if detail:
            found.append((name, str(detail)))
    if lengths is not None and "length_shift" in names and reply.text is not None and not found:
        # only for an answer nothing else found wrong (an empty one is "empty", not a shift)
        size = len(reply.text)
        detail = _run("length_shift", lambda r, a: lengths.check(size), reply, ask)
        if detail:
            found.append(("length_shift", str(detail)))
        # learnt even when shifted, slowly: a lasting change of the answers' lengths becomes
        # the baseline (unlearnt, it would be garbage for ever and keep the breaker opening)
        lengths.learn(size, SHIFTED_WEIGHT if detail else 1.0)
    invalid = False
    if validate is not None:
        try:
            invalid = not validate(resp)
        except Exception:
            invalid = True
        if invalid:
            found.append(("validate", "validate() rejected the result"))
    return Verdict(
        not found, tuple(n for n, _ in found), tuple(d for _, d in found), invalid=invalid
    )
