"""Coordination through external state: lease locks with fencing tokens
(``locks``), leader election (``election``), versioned records with compare-and-set
(``records``).

May import: ``store`` and the shared modules (``errors``, ``checks``, ``clock``,
``background``). Never Celery, nor the limiter.
"""
