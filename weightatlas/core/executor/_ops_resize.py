"""``Resize`` and ``Upsample``: nearest, linear and cubic, separable along each axis.

Output sizes are static, so for each resized axis the source positions and the
interpolation weights are computed once in numpy (following the ONNX reference
implementation: coordinate transformation, neighbour selection, ``exclude_outside``,
antialiasing, ``tf_crop_and_resize`` extrapolation). The traced part is then a gather
along the axis and a weighted sum over the neighbours, which JAX differentiates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ._graph import Node
from ._registry import Call, Tensor, normalize_axes, op

__all__: list[str] = []

_MODES = ("nearest", "linear", "cubic")
_TRANSFORMS = ("half_pixel", "asymmetric", "pytorch_half_pixel", "tf_crop_and_resize",
               "align_corners", "half_pixel_symmetric", "tf_half_pixel_for_nn")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
_POLICIES = ("stretch", "not_larger", "not_smaller")

Coeffs = Callable[[float, float], np.ndarray]


def _check_resize(node: Node) -> str | None:
    for key, allowed in (("mode", _MODES), ("coordinate_transformation_mode", _TRANSFORMS),
                         ("nearest_mode", _NEAREST),
                         ("keep_aspect_ratio_policy", _POLICIES)):
        value = node.attrs.get(key)
        if value is not None and value not in allowed:
            return f"{key}={value!r} is not one of {allowed}"
    return None


def _nearest(mode: str) -> Coeffs:
    def coeffs(ratio: float, scale: float) -> np.ndarray:
        if float(ratio).is_integer():
            return np.array([0.0, 1.0])
        if mode == "round_prefer_floor":
            return np.array([ratio <= 0.5, ratio > 0.5], dtype=np.float64)
        if mode == "round_prefer_ceil":
            return np.array([ratio < 0.5, ratio >= 0.5], dtype=np.float64)
        return np.array([1.0, 0.0]) if mode == "floor" else np.array([0.0, 1.0])

    return coeffs


def _linear(antialias: bool) -> Coeffs:
    def coeffs(ratio: float, scale: float) -> np.ndarray:
        if not antialias:
            return np.array([1 - ratio, ratio])
        scale = min(scale, 1.0)
        start = int(np.floor(-1 / scale) + 1)
        args = (np.arange(start, start + 2 - 2 * start) - ratio) * scale
        w = np.clip(1 - np.abs(args), 0, 1)
        return w / w.sum()

    return coeffs


def _cubic(a: float, antialias: bool) -> Coeffs:
    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0

    def coeffs(ratio: float, scale: float) -> np.ndarray:
        if not antialias:
            return np.array([kernel(ratio + 1), kernel(ratio), kernel(1 - ratio),
                             kernel(2 - ratio)])
        scale = min(scale, 1.0)
        start = int(np.floor(-2 / scale) + 1)
        w = np.array([kernel(scale * (i - ratio)) for i in range(start, 2 - start)])
        return w / w.sum()

    return coeffs


def _source(mode: str, out: int, scale: float, size: int, roi: tuple[float, float] | None
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """Source coordinate of each output position, and which ones extrapolate."""
    y = np.arange(out, dtype=np.float64)
    width = scale * size
    if mode == "align_corners":
        return (np.zeros(out) if width == 1 else y * (size - 1) / (width - 1)), None
    if mode == "asymmetric":
        return y / scale, None
    if mode == "tf_crop_and_resize":
        lo, hi = roi if roi is not None else (0.0, 1.0)
        x = (np.full(out, (hi - lo) * (size - 1) / 2) if width == 1
             else y * (hi - lo) * (size - 1) / (width - 1)) + lo * (size - 1)
        return x, (x < 0) | (x > size - 1)
    if mode == "pytorch_half_pixel":
        return (np.full(out, -0.5) if width == 1 else (y + 0.5) / scale - 0.5), None
    if mode == "half_pixel_symmetric":
        offset = size / 2 * (1 - out / width)
        return offset + (y + 0.5) / scale - 0.5, None
    if mode == "tf_half_pixel_for_nn":
        return (y + 0.5) / scale, None
    return (y + 0.5) / scale - 0.5, None


def _plan(size: int, out: int, scale: float, coeffs: Coeffs, transform: str,
          roi: tuple[float, float] | None, exclude_outside: bool
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(neighbour indices [out, n], weights [out, n], extrapolated mask) for one axis."""
    x, extrapolated = _source(transform, out, scale, size, roi)
    base = np.floor(x)
    ratios = np.where(x == base, 1.0, x - base)
    w = np.stack([np.asarray(coeffs(float(r), scale), dtype=np.float64) for r in ratios])
    n = w.shape[1]
    pad = math.ceil(n / 2)
    padded = x + pad
    p = np.floor(padded)
    frac = padded - p
    if n % 2 == 0:
        offset = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    index = (p + offset).astype(np.int64)[:, None] + np.arange(n)[None, :] - pad
    if exclude_outside:
        w = np.where((index < 0) | (index >= size), 0.0, w)
        total = w.sum(axis=1, keepdims=True)
        w = w / np.where(total == 0, 1.0, total)
    return np.clip(index, 0, size - 1), w, extrapolated


def _resize(c: Call, x: Tensor, roi: np.ndarray | None, scales: list[float] | None,
            sizes: list[int] | None, *, opset11: bool) -> Tensor:
    import jax.numpy as jnp

    x = jnp.asarray(x)
    rank = x.ndim
    axes = (normalize_axes(c, c.attr("axes"), rank) if c.has("axes")
            else list(range(rank)))
    given = scales if scales is not None else sizes
    if given is None or len(given) != len(axes):
        raise c.shape_error(f"Resize needs one scale or size per resized axis ({len(axes)}), "
                            f"found {given}")
    dims = list(x.shape)
    if sizes is not None:
        factor = [sizes[i] / dims[a] for i, a in enumerate(axes)]
        policy = c.attr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            common = min(factor) if policy == "not_larger" else max(factor)
            factor = [common] * len(axes)
            out = [int(common * dims[a] + 0.5) for a in axes]
        else:
            out = list(sizes)
    else:
        factor = list(scales or [])
        out = [int(f * dims[a]) for f, a in zip(factor, axes, strict=True)]
    if opset11:
        transform = c.attr("coordinate_transformation_mode", "half_pixel")
        nearest_mode = c.attr("nearest_mode", "round_prefer_floor")
    else:
        transform, nearest_mode = "asymmetric", "floor"
    mode = c.attr("mode", "nearest")
    antialias = bool(c.attr("antialias", 0))
    coeffs = (_nearest(nearest_mode) if mode == "nearest" else _linear(antialias)
              if mode == "linear" else _cubic(c.attr("cubic_coeff_a", -0.75), antialias))
    dtype = x.dtype
    y = x if jnp.issubdtype(dtype, jnp.floating) else x.astype(jnp.float32)
    fill = c.attr("extrapolation_value", 0.0)
    for i, a in enumerate(axes):
        axis_roi = None if roi is None else (float(roi[i]), float(roi[i + len(axes)]))
        trivial = axis_roi is None or (axis_roi == (0.0, 1.0))
        if math.isclose(factor[i], 1.0) and out[i] == dims[a] and trivial:
            continue
        index, w, extrapolated = _plan(dims[a], out[i], factor[i], coeffs, transform,
                                       axis_roi, bool(c.attr("exclude_outside", 0)))
        if mode == "nearest":
            picked = index[np.arange(out[i]), np.argmax(w, axis=1)]
            y = jnp.take(y, picked, axis=a)
        else:
            gathered = jnp.take(y, index.reshape(-1), axis=a)
            gathered = jnp.reshape(gathered, (*y.shape[:a], out[i], w.shape[1], *y.shape[a + 1:]))
            shape = (1,) * a + w.shape + (1,) * (y.ndim - a - 1)
            y = jnp.sum(gathered * w.reshape(shape).astype(y.dtype), axis=a + 1)
        if extrapolated is not None and extrapolated.any():
            mask = extrapolated.reshape((1,) * a + (out[i],) + (1,) * (y.ndim - a - 1))
            y = jnp.where(mask, jnp.asarray(fill, y.dtype), y)
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        y = jnp.clip(jnp.round(y), info.min, info.max)
    return y.astype(dtype)


@op("Resize", check=_check_resize, static=(1, 2, 3))
def _resize_op(c: Call, x: Tensor, roi: Tensor = None, scales: Tensor = None,
               sizes: Tensor = None) -> Tensor:
    if c.opset < 11:  # Resize-10: (X, scales)
        found = [float(s) for s in c.static(roi, "the scales").reshape(-1)]
        return _resize(c, x, None, found, None, opset11=False)
    roi_v = None if roi is None else c.static(roi, "the roi").astype(np.float64).reshape(-1)
    if roi_v is not None and (roi_v.size == 0 or c.attr("coordinate_transformation_mode")
                              != "tf_crop_and_resize"):
        roi_v = None
    scale_v = None if scales is None else c.static(scales, "the scales").reshape(-1)
    if scale_v is not None and scale_v.size == 0:
        scale_v = None
    size_v = None if sizes is None else c.static_ints(sizes, "the output sizes")
    return _resize(c, x, roi_v, None if scale_v is None else [float(s) for s in scale_v],
                   size_v, opset11=True)


@op("Upsample", check=_check_resize, static=(1,))
def _upsample(c: Call, x: Tensor, scales: Tensor = None) -> Tensor:
    found = c.attr("scales") if scales is None else c.static(scales, "the scales").reshape(-1)
    return _resize(c, x, None, [float(s) for s in found], None, opset11=False)
