"""The limiter: admission to a limit in one Redis round trip, and what rides on it.

Holds the limits' configuration and checks (``config``), the decision a caller gets
(``decision``), the fair line of waiters (``line``), the running call (``run``), the
blocking and asyncio slots (``slot``, ``aslot``) with the lease keeper that renews them
(``keeper``), adaptive limits (``adaptive``), capacity discovery above a declared rate
(``discover``), the fleet-wide breaker (``breaker``),
providers' headers (``providers``), a slot's quality verdict and routing (``judging``, over
:mod:`celery_fleet.quality`), guarded functions (``guarded``), backoff math
(``backoff``), the engine that runs the admission scripts (``core``), and limits
changed at runtime: which fields may change and how they merge (``overrides``), and how
they are stored, versioned and polled (``runtime``).

May import: ``store``, ``resilience`` (the store-down strategy), ``quality`` (detectors and
the quality breaker), and the shared ``errors``,
``checks``, ``clock``, ``background``.
Never Celery.
"""
