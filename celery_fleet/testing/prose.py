"""The text of the simulator's healthy answers: plain sentences of varied words.

A healthy answer has to pass for one: the quality detectors (``quality: True``) judge the
simulator's answers like any model's, so a good answer must not look degenerate. Echoing
the prompt's words in a cycle did ("write a paragraph write a paragraph ..." is a loop the
``repetition`` detector rightly flags), so the words are drawn from a fixed vocabulary,
in sentences of 4 to 14 words. The draw is seeded by the prompt's words and the length:
the same request gets the same answer in any process and whatever order requests arrive
in (the simulator's own ``seed`` still decides how many tokens an answer has).

One word is one output token (the simulator's token semantics), joined by single spaces.

Example::

    text = reply_text(("write", "a", "paragraph"), 200)
    assert len(text.split(" ")) == 200
"""

from __future__ import annotations

import random
import zlib

__all__ = ["VOCABULARY", "MAX_WORDS", "reply_text"]

#: The words of a healthy answer: common, neutral, none that opens a refusal.
VOCABULARY = tuple(
    """
    the a an this that each every some many few our their its of in on at by for with from
    into over under between after before during while when where because so and but or yet
    then also often usually rarely clearly quickly carefully simply mostly
    plan team project system model answer result report data value table record field
    service request response budget limit queue worker task job step stage phase cycle
    city river market garden library museum bridge harbour station village valley forest
    people users readers engineers writers students teachers customers partners
    is are was were has have makes keeps gives shows needs uses finds builds moves holds
    reads writes checks changes improves explains describes supports follows reaches
    small large quiet busy early late simple careful useful common recent local modern
    clear steady open shared daily weekly new old green bright long short
    """.split()
)
#: An answer has about one word per output token, up to this many words.
MAX_WORDS = 512

_SHORTEST, _LONGEST = 4, 14


def reply_text(words: tuple[str, ...], output_tokens: int) -> str:
    """A healthy answer of ``min(output_tokens, MAX_WORDS)`` words, seeded by ``words``
    (the prompt's) so that a request's answer is reproducible; "" for no tokens."""
    count = min(max(output_tokens, 0), MAX_WORDS)
    seed = zlib.crc32(f"{' '.join(words)}|{count}".encode("utf-8", "replace"))
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        length = min(rng.randint(_SHORTEST, _LONGEST), count - len(out))
        sentence = [rng.choice(VOCABULARY) for _ in range(length)]
        sentence[0] = sentence[0].capitalize()
        if length > 7 and rng.random() < 0.4:
            at = rng.randint(3, length - 3)
            sentence[at] += ","
        sentence[-1] += "."
        out.extend(sentence)
    return " ".join(out)
