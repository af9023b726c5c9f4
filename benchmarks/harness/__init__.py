"""What the benchmarks and ``make demo`` run the example fleet with; not part of the example.

- :mod:`.herd`: the thundering-herd runner (a ``ProviderSim``, real ``celery worker``
  processes on ``example_project.app``, every agent fired at once, measured from the
  provider's own log), and the process helpers the tests share (``stop_processes``,
  ``close_app``, ``BreakerEvents``);
- :mod:`.baselines`: the research agent as people write it without the fleet (plain, and
  Celery's ``autoretry_for``), the herd's comparison;
- :mod:`.goodput` and :mod:`.goodput_agents`: sustained overload, paid against useful calls;
- :mod:`.beat_agents`: the 02:00 fan-out under a real ``celery beat``;
- :mod:`.distribution`, :mod:`.distribution_app` and :mod:`.distribution_workers`: who
  runs where (issue 24): the workload, the warm-up cache, the figures; the workers' app;
  starting, readying and cleaning up after the workers;
- :mod:`.demo` (``make demo``) and :mod:`.plot` (``demo-herd.png``).

The agents modules import the example's app and model client (``example_project``), and the
scripts in ``benchmarks/`` import these; nothing in ``celery_fleet`` or ``example_project``
imports the harness.
"""
