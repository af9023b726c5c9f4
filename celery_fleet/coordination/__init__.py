"""Coordination through external state: lease locks with fencing tokens
(``locks``), leader election (``election``), versioned records with compare-and-set
(``records``).

May import: ``store``, the lease keeper (``admission.keeper``), ``errors``, ``checks``.
Never Celery.
"""
