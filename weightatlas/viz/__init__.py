"""Charts: functions that take store data or Arrow tables and return Altair charts.

The viz layer never imports adapters or frameworks. Its chart builders land with the
charts issue; what it exports is listed in ``__all__``.
"""

from __future__ import annotations

__all__: list[str] = []
