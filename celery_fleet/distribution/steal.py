"""When an idle worker steals from a peer's affinity queue, and when it gives it back.

Example::

    planner = StealPlanner(threshold=4)
    start, stop = planner.decide(depths={0: 0, 3: 9, 5: 6}, own={0}, idle=True)
    # start == 3: the deepest peer queue past the threshold; stop is None

A worker steals only while it is idle (a free pool slot, and its own queues empty), and
only from a queue deeper than the threshold, so locality is given up only where it buys
balance. It keeps consuming the stolen queue until its depth falls below the low mark
(half the threshold): hysteresis, so a queue hovering around the threshold does not make
the worker add and cancel a consumer every sample. One stolen queue at a time.

The depths come from the broker, sampled by the caller about once a second, never per
task. Pure: this module does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["StealPlanner"]


class StealPlanner:
    """The steal decisions of one worker (which peer queue it consumes now, if any).

    Args:
        threshold: a peer queue deeper than this may be stolen from.
        low_mark: a stolen queue is given back once shallower than this (default:
            half the threshold, at least 1: with a threshold of 1, ``1 // 2`` is 0 and
            "below 0" never happens, so an emptied queue would be kept for good).
    """

    def __init__(self, threshold: int, low_mark: int | None = None) -> None:
        self.threshold = threshold
        self.low_mark = max(1, threshold // 2) if low_mark is None else low_mark
        #: The peer queue this worker consumes now (None: none).
        self.stolen: int | None = None

    def decide(
        self, depths: Mapping[int, int], own: set[int], idle: bool
    ) -> tuple[int | None, int | None]:
        """``(start, stop)``: the queue to start stealing from and the one to give back
        (None: no change). ``depths`` are the sampled depths by queue (a missing queue
        counts as empty unless it is the stolen one, which is then kept); ``own`` the
        queues this worker is the home of; ``idle`` whether it has a free pool slot."""
        stop = None
        if self.stolen is not None:
            if self.stolen in own:
                self.stolen = None  # it became ours: consumed as its home from now on
            elif self.stolen in depths and depths[self.stolen] < self.low_mark:
                stop, self.stolen = self.stolen, None
        if self.stolen is not None or not idle:
            return None, stop
        if any(depths.get(q, 0) > 0 for q in own):
            return None, stop  # its own work first
        peers = [(d, q) for q, d in depths.items() if q not in own and d > self.threshold]
        if not peers:
            return None, stop
        deepest = max(peers, key=lambda dq: (dq[0], -dq[1]))[1]
        if deepest == stop:
            return None, None  # not below the low mark after all: keep it
        self.stolen = deepest
        return deepest, stop

    def forget(self) -> int | None:
        """Give the stolen queue back (the worker stops); returns it."""
        stolen, self.stolen = self.stolen, None
        return stolen
