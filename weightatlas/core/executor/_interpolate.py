"""Resizing attribution maps to the input's size: Grad-CAM's coarse map over the image.

:func:`interpolate` is PyTorch's ``torch.nn.functional.interpolate`` for the modes
attribution maps use (``bilinear``, ``linear``, ``trilinear`` with
``align_corners=False``, and ``nearest``), which Captum's
``LayerAttribution.interpolate`` calls; it is written in NumPy (a separable resize, one
spatial axis at a time), so its results compare to Captum's directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from weightatlas.errors import ShapeError, UnsupportedError

__all__ = ["INTERPOLATION_MODES", "interpolate"]

#: Modes of :func:`interpolate` (``linear``, ``bilinear`` and ``trilinear`` are one rule).
INTERPOLATION_MODES = ("bilinear", "linear", "trilinear", "nearest")


def interpolate(values: np.ndarray, size: Sequence[int], mode: str = "bilinear"
                ) -> np.ndarray:
    """Resizes ``[batch, channels, *spatial]`` maps to ``size`` (one length per spatial axis).

    Linear modes use half-pixel centres (PyTorch's ``align_corners=False``): output
    position ``i`` samples the input at ``(i + 0.5) * in / out - 0.5``, clamped at 0;
    ``nearest`` takes input index ``floor(i * in / out)``.

    Example:
        >>> cam = np.array([[[[0.0, 1.0], [2.0, 3.0]]]])
        >>> interpolate(cam, (4, 4))[0, 0, 0].tolist()
        [0.0, 0.25, 0.75, 1.0]
    """
    if mode not in INTERPOLATION_MODES:
        raise UnsupportedError(f"interpolation mode {mode!r} is not one of "
                               f"{', '.join(INTERPOLATION_MODES)}")
    out = np.asarray(values)
    size = tuple(int(s) for s in size)
    if out.ndim != len(size) + 2:
        raise ShapeError(f"interpolate: values of shape {list(out.shape)} have "
                         f"{max(out.ndim - 2, 0)} spatial axes after [batch, channels]; size "
                         f"{list(size)} names {len(size)}")
    if any(s < 1 for s in size):
        raise ShapeError(f"interpolate: size {list(size)} must be positive")
    dtype = out.dtype if np.issubdtype(out.dtype, np.floating) else np.dtype(np.float32)
    out = out.astype(dtype, copy=False)
    for axis, n_out in enumerate(size, start=2):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        scale = n_in / n_out
        if mode == "nearest":
            index = np.minimum(np.floor(np.arange(n_out) * scale).astype(np.int64), n_in - 1)
            out = np.take(out, index, axis=axis)
            continue
        src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (src - lo).astype(dtype)
        shape = [1] * out.ndim
        shape[axis] = n_out
        frac = frac.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, hi, axis=axis) * frac
    return out
