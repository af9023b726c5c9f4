"""The kinds of garbage the simulator answers with: a 200 whose output is useless.

A provider that degrades quality without degrading availability answers 200 with an empty
completion, a truncated one (``finish_reason: "length"`` after a few tokens), a refusal,
broken JSON or a degenerate loop. A :class:`~celery_fleet.testing.Phase` with
``garbage="refusal", share=0.2`` turns a fifth of its answers into that kind; this module
says what each kind's text, output tokens and finish reason are. Pure: no clock, no I/O.

Example::

    garbage_output("repetition", ("the", "plan"), 20) == (" ".join(["the"] * 20), 20, "stop")
    garbage_output("truncated", ("the", "plan"), 200)  # (4 words of a good answer, 4, "length")

A good answer's text (``kind=""``) is :func:`~celery_fleet.testing.prose.reply_text`'s.
"""

from __future__ import annotations

from .prose import reply_text

__all__ = ["KINDS", "REFUSAL_TEXT", "TRUNCATED_TOKENS", "garbage_output"]

#: Every kind a phase may name; ``True`` in a phase means ``"empty"``.
KINDS = ("empty", "truncated", "refusal", "invalid_json", "repetition")
#: What a refusal says (a phrase every refusal detector knows).
REFUSAL_TEXT = "I'm sorry, but I can't help with that request."
#: How many tokens a truncated answer stops after, whatever ``max_tokens`` allowed.
TRUNCATED_TOKENS = 4


def garbage_output(kind: str, words: tuple[str, ...], output_tokens: int) -> tuple[str, int, str]:
    """``(text, output tokens, finish reason)`` of an answer of ``kind`` ("" = a good one).

    ``finish_reason`` is OpenAI's (``"stop"`` or ``"length"``); the Anthropic dialect maps
    ``"length"`` to its ``"max_tokens"``.
    """
    if not kind:
        return reply_text(words, output_tokens), output_tokens, "stop"
    if kind == "empty":
        return "", 0, "stop"
    if kind == "truncated":
        n = min(TRUNCATED_TOKENS, output_tokens)
        return reply_text(words, n), n, "length"
    if kind == "refusal":
        return REFUSAL_TEXT, len(REFUSAL_TEXT.split()), "stop"
    if kind == "invalid_json":
        text = '{"answer": "' + reply_text(words, min(output_tokens, 16))
        return text, min(output_tokens, 16) + 3, "stop"
    if kind == "repetition":
        n = max(16, output_tokens)
        return " ".join([(words or ("ok",))[0]] * min(n, 512)), n, "stop"
    raise ValueError(f"unknown garbage kind {kind!r} (kinds: {', '.join(KINDS)})")
