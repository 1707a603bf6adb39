"""Computations against the store (statistics, spectra, projections, executor).

The core layer reads :mod:`weightatlas.storage` snapshots and never imports adapters,
charts or the CLI. Its analyses land with their issues; what it exports is listed in
``__all__``.
"""

from __future__ import annotations

__all__: list[str] = []
