"""Training trajectories: how each tensor moves from snapshot to snapshot.

For the step-numbered snapshots of a model, in step order (tagged snapshots have no
place in time and are left out), and for every tensor:

- ``norm`` ``= ||W_t||``
- ``update_norm`` ``= ||W_t - W_{t-1}||``
- ``relative_update`` ``= ||W_t - W_{t-1}|| / ||W_{t-1}||``
- ``update_cosine``: cosine between successive updates ``W_t - W_{t-1}`` and
  ``W_{t-1} - W_{t-2}`` (1: the same direction again; -1: undoing it)
- ``distance_from_init`` ``= ||W_t - W_0||`` and ``relative_distance`` (over ``||W_0||``)

Norms are Frobenius norms in float64. A tensor whose shape changes, that goes missing,
or that holds NaN/Inf is not crashed on: its rows carry a ``status`` saying so and
null figures until it is comparable again (after a shape change it starts over).
Memory is bounded by a few copies of the largest tensor (tensors are read one at a
time, zero-copy).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from weightatlas.errors import ShapeError
from weightatlas.storage import Snapshot, Store

__all__ = ["TRAJECTORY_SCHEMA", "trajectory"]

TRAJECTORY_SCHEMA = pa.schema([
    ("tensor", pa.string()), ("step", pa.int64()), ("norm", pa.float64()),
    ("update_norm", pa.float64()), ("relative_update", pa.float64()),
    ("update_cosine", pa.float64()), ("distance_from_init", pa.float64()),
    ("relative_distance", pa.float64()), ("status", pa.string()),
])


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def trajectory(store: Store, model: str, tensors: Iterable[str] | None = None) -> pa.Table:
    """Per-tensor update statistics over the step-numbered snapshots of a model.

    Returns:
        One row per (tensor, step) with :data:`TRAJECTORY_SCHEMA`; ``status`` is
        ``"ok"``, ``"first"`` (no update yet), ``"missing"``, ``"non-finite values"``,
        ``"resumed"`` (the first comparable snapshot after a gap: no update) or
        ``"shape changed"`` (the tensor starts over from that snapshot).

    Example:
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> for step, value in [(0, 1.0), (1, 2.0), (2, 4.0)]:
        ...     _ = store.write(RecordsSource([TensorRecord("w", np.full(4, value))]),
        ...                     "m", step=step)
        >>> trajectory(store, "m").column("update_norm").to_pylist()
        [None, 2.0, 4.0]
    """
    infos = [i for i in store.snapshots(model) if i.step is not None]
    if len(infos) < 2:
        raise ShapeError(f"model {model!r}: a trajectory needs at least 2 step-numbered "
                         f"snapshots, found {len(infos)}")
    snaps = [Snapshot(i.path) for i in infos]
    try:
        names = list(tensors) if tensors is not None else _all_names(snaps)
        out: dict[str, list[object]] = {f.name: [] for f in TRAJECTORY_SCHEMA}
        for name in names:
            _tensor_rows(out, name, snaps)
    finally:
        for s in snaps:
            s.close()
    return pa.table(out, schema=TRAJECTORY_SCHEMA)


def _all_names(snaps: list[Snapshot]) -> list[str]:
    seen: dict[str, None] = {}
    for s in snaps:
        for n in s.names:
            seen.setdefault(n, None)
    return list(seen)


def _tensor_rows(out: dict[str, list[object]], name: str, snaps: list[Snapshot]) -> None:
    init: np.ndarray | None = None
    prev: np.ndarray | None = None
    prev_update: np.ndarray | None = None
    for snap in snaps:
        row: dict[str, object] = {"tensor": name, "step": snap.step}
        if name not in snap:
            row["status"] = "missing"
            prev = prev_update = None
        else:
            w = snap.read(name).astype(np.float64).reshape(-1)
            info = snap.info(name)
            row["norm"] = float(np.linalg.norm(w)) if np.isfinite(w).all() else None
            if info.n_nan or info.n_inf:
                row["status"] = "non-finite values"
                prev = prev_update = None
            elif init is not None and init.shape != w.shape:
                # The tensor starts over from here: nothing before is comparable.
                row["status"] = "shape changed"
                init, prev, prev_update = w, w, None
            else:
                if init is None:
                    init = w
                    row["status"] = "first"
                elif prev is None:
                    row["status"] = "resumed"  # after a gap: no update to measure
                else:
                    update = w - prev
                    update_norm = float(np.linalg.norm(update))
                    row["update_norm"] = update_norm
                    row["relative_update"] = _ratio(update_norm, float(np.linalg.norm(prev)))
                    if prev_update is not None:
                        denom = float(np.linalg.norm(prev_update)) * update_norm
                        row["update_cosine"] = _ratio(float(prev_update @ update), denom)
                    prev_update = update
                    row["status"] = "ok"
                distance = float(np.linalg.norm(w - init))
                row["distance_from_init"] = distance
                row["relative_distance"] = _ratio(distance, float(np.linalg.norm(init)))
                prev = w
        for key in out:
            out[key].append(row.get(key))
