"""How Redis is reached: URLs, clients, the coalescing combiner, the scripts.

Holds URL parsing and client construction (``connect``, ``sentinel``, ``cluster``), the
per-process sync store (``sync``) and its asyncio twin (``aio``), the combiner that sends
concurrent callers' commands in one pipeline (``combiner``), the sans-IO call protocol
the limiter drives (``calls``), wake-up listeners (``wakeups``), the Lua scripts
(``scripts/<concern>/``, with shared parts in ``scripts/_lib/``) and their KEYS, ARGV and
replies, declared once (``specs``).

May import: the shared modules (``errors``, ``checks``, ``clock``, ``background``).
Nothing of the limiter, and never Celery.
"""
