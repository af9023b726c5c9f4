"""Degraded-quality detection: "the request succeeds but the output is garbage".

Holds the built-in detectors over one model answer (``detectors``, with a minimal JSON
Schema checker in ``schema``), the verdict and the per-process output-length baseline
(``judge``), the ``"quality"`` option of a limit (``config``), and the Python side of the
fleet-wide quality breaker in Redis (``breaker``; its scripts are
``store/scripts/quality/``). ``Slot.judge`` (admission) joins them to a held slot.

May import: ``store`` and the shared ``errors``, ``checks``, ``clock``, ``background``
(never ``admission``, which imports this package). Never Celery.
"""

from .breaker import QualityBreakers, QualityState
from .config import DETECTOR_NAMES, QualityConfig, parse_quality
from .detectors import Ask, Reply, read_reply
from .judge import LengthBaseline, Verdict, ask_of, judge

__all__ = [
    "Ask",
    "DETECTOR_NAMES",
    "LengthBaseline",
    "QualityBreakers",
    "QualityConfig",
    "QualityState",
    "Reply",
    "Verdict",
    "ask_of",
    "judge",
    "parse_quality",
    "read_reply",
]
