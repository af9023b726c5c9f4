"""Script calls packed once, as RESP bytes, for the combiner's wire.

``execute_command`` encodes every argument of a 20-argument EVALSHA on every call, although
all but four of them (lease id, tokens, age, join) are fixed per limit. :class:`Packed`
encodes the fixed head and tail once, and a call only encodes what varies.
:func:`pack_command` packs a plain command for the same wire.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Packed", "encode", "pack_command"]


def encode(value: object) -> bytes:
    """One argument as redis-py would send it (bytes as is, str as UTF-8, numbers by repr)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        raise TypeError("a bool is not a Redis argument")  # redis-py refuses them too
    if isinstance(value, int | float):
        return repr(value).encode()
    raise TypeError(f"cannot send {type(value).__name__} to Redis")


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


def pack_command(*args: object) -> bytes:
    """A plain command (``pack_command("HGETALL", key)``) as RESP, for the combiner's wire."""
    return b"*%d\r\n" % len(args) + b"".join(_bulk(encode(a)) for a in args)


class Packed:
    """An EVALSHA whose keys and trailing arguments are fixed, packed once as RESP.

    ``Packed(script, sha, keys, n_varying, tail).pack(a, b, ...)`` returns the bytes of
    ``EVALSHA sha len(keys) *keys a b ... *tail``: the ``n_varying`` arguments in front of
    the tail (and ``n_after`` ones after it) are the only ones encoded per call.
    """

    __slots__ = ("script", "_head", "_tail", "_n", "_after")

    def __init__(
        self,
        script: str,
        sha: str,
        keys: Sequence[str],
        n_varying: int,
        tail: Sequence[object],
        n_after: int = 0,
    ) -> None:
        self.script = script
        self._n = n_varying
        self._after = n_after
        parts = 3 + len(keys) + n_varying + len(tail) + n_after
        fixed = [b"EVALSHA", sha.encode(), str(len(keys)).encode(), *map(encode, keys)]
        self._head = b"*%d\r\n" % parts + b"".join(map(_bulk, fixed))
        self._tail = b"".join(_bulk(encode(x)) for x in tail)

    def pack(self, *varying: bytes) -> bytes:
        """The command with these arguments, already encoded (``str(n).encode()``...): the
        first ``n_varying`` in front of the tail, the last ``n_after`` after it."""
        if len(varying) != self._n + self._after:
            n = self._n + self._after
            raise TypeError(f"{self.script}: {n} varying arguments, got {len(varying)}")
        if not self._after:  # a loop, not a comprehension (a frame of its own per call)
            out = [self._head]
            for a in varying:
                out.append(b"$%d\r\n%b\r\n" % (len(a), a))
            out.append(self._tail)
            return b"".join(out)
        front = b"".join([b"$%d\r\n%b\r\n" % (len(a), a) for a in varying[: self._n]])
        back = b"".join([b"$%d\r\n%b\r\n" % (len(a), a) for a in varying[self._n :]])
        return self._head + front + self._tail + back
