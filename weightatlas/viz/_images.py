"""Images as Vega-Lite pixels: parsing image arrays, pooling them in blocks, colours as hex.

An image is drawn as ``mark_rect`` cells whose colour is a hex string taken as is
(``scale=None``): it renders the same in vl-convert's SVG and PNG and in the offline HTML
export, and it needs no image loading. Images larger than the cell budget are pooled in
square blocks of pixels (block means, never sampled), so a spec stays within its byte
budget. :func:`images` draws a row of images (feature visualizations, inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from weightatlas.errors import ShapeError, UnsupportedError
from weightatlas.viz._reduce import as_float, block_reduce
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    dims,
    fit_budget,
    header_chart,
    inline_data,
    inline_values,
)

if TYPE_CHECKING:
    import altair as alt

__all__ = ["as_images", "hex_colors", "image_factor", "images", "pool_images", "to_unit"]

_HEX = np.array([f"{i:02x}" for i in range(256)])
#: Cells per image before :func:`images` pools blocks of pixels.
DEFAULT_IMAGE_CELLS = 4096


def as_images(array: Any, name: str = "image", *, channels_last: bool | None = None,
              ) -> tuple[np.ndarray, bool]:
    """Images as ``[n, height, width, channels]`` (channels 1 or 3), and whether ``array``
    was a batch.

    Accepted: ``[h, w]`` (grayscale); ``[c, h, w]`` or ``[h, w, c]`` with ``c`` 1 or 3;
    a batch ``[n, c, h, w]`` or ``[n, h, w, c]``. Channels first (the executor's NCHW) wins
    when both ends could be channels, unless ``channels_last=True``.

    Raises:
        ShapeError: Any other shape.

    Example:
        >>> x, batched = as_images(np.zeros((3, 5, 4)))
        >>> x.shape, batched
        ((1, 5, 4, 3), False)
    """
    a = as_float(np.asarray(array), name)
    shape = list(a.shape)
    if a.ndim == 2:
        return a[None, :, :, None], False
    if a.ndim not in (3, 4):
        raise ShapeError(f"{name}: shape {shape} is not an image; expected [h, w], [c, h, w], "
                         "[h, w, c] or a batch [n, c, h, w] / [n, h, w, c] with c = 1 or 3")
    batched = a.ndim == 4
    x = a if batched else a[None]
    first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
    if channels_last is None:
        channels_last = last and not first
    if (channels_last and not last) or (not channels_last and not first):
        where, count = ("last", x.shape[3]) if channels_last else ("first", x.shape[1])
        raise ShapeError(f"{name}: shape {shape} has {count} channels {where}; expected 1 or 3 "
                         "channels (grayscale or RGB)")
    x = x if channels_last else x.transpose(0, 2, 3, 1)
    if min(x.shape[1:3]) < 1 or x.shape[0] < 1:
        raise ShapeError(f"{name}: shape {shape} holds no pixels")
    return x, batched


def to_unit(x: np.ndarray, value_range: tuple[float, float] | None, name: str = "image",
            ) -> tuple[np.ndarray, str]:
    """Pixel values mapped to [0, 1] (clipped), and a note on how.

    ``value_range=(lo, hi)`` maps ``lo`` to 0 and ``hi`` to 1. Without it, values already
    in [0, 1] are kept, other values are stretched per image from their min to their max.
    """
    x = np.asarray(x, np.float64)
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise UnsupportedError(f"{name}: value_range={value_range!r}; expected (lo, hi) "
                                   "with lo < hi")
        return np.clip((x - lo) / (hi - lo), 0, 1), f"pixels {lo:g}..{hi:g} drawn as 0..1"
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, 0.0)
    if x.size and x.min() >= 0 and x.max() <= 1:
        return x, "pixels in 0..1"
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    scale = np.where(hi > lo, hi - lo, 1.0)
    return (x - lo) / scale, "pixels stretched per image from their min to their max"


def image_factor(height: int, width: int, cells: int) -> int:
    """Side of the square blocks that pool an image into at most ``cells`` cells."""
    f = max(1, math.ceil(math.sqrt(height * width / max(cells, 1))))
    while f < max(height, width) and math.ceil(height / f) * math.ceil(width / f) > cells:
        f += 1
    return f


def pool_images(x: np.ndarray, factor: int) -> np.ndarray:
    """Block means of ``[n, h, w, c]`` images over ``factor x factor`` pixels (the last
    blocks may be smaller): ``[n, ceil(h/f), ceil(w/f), c]``."""
    if factor == 1:
        return x
    return block_reduce(x, (1, factor, factor, 1), "image").mean


def hex_colors(unit: np.ndarray) -> np.ndarray:
    """``#rrggbb`` strings of ``[..., c]`` values in [0, 1] (c = 1: gray), each channel
    rounded to 8 bits.

    Example:
        >>> hex_colors(np.array([[1.0, 0.5, 0.0]])).tolist()
        ['#ff8000']
    """
    q = np.rint(np.clip(np.nan_to_num(unit), 0, 1) * 255).astype(np.int64)
    if q.shape[-1] == 1:
        q = np.repeat(q, 3, axis=-1)
    h = _HEX[q]
    return np.char.add(np.char.add(np.char.add("#", h[..., 0]), h[..., 1]), h[..., 2])


def pixel_columns(unit: np.ndarray, factor: int) -> tuple[dict[str, Any], tuple[int, int]]:
    """Columns ``n``, ``gy``, ``gx``, ``c`` (hex colour) of pooled images, C order, and the
    grid (rows, columns) of one image."""
    pooled = pool_images(unit, factor)
    n, gh, gw = pooled.shape[:3]
    gn, gy, gx = (m.reshape(-1) for m in np.meshgrid(
        np.arange(n), np.arange(gh), np.arange(gw), indexing="ij"))
    return {"n": gn, "gy": gy, "gx": gx, "c": hex_colors(pooled).reshape(-1).tolist()}, (gh, gw)


def images(
    images: Any,
    labels: Sequence[str] | None = None,
    *,
    name: str | None = None,
    columns: int | None = None,
    value_range: tuple[float, float] | None = None,
    channels_last: bool | None = None,
    max_cells: int = DEFAULT_IMAGE_CELLS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.VConcatChart:
    """A grid of images drawn pixel for pixel (feature visualizations, inputs).

    Args:
        images: One image or a batch (see :func:`as_images`).
        labels: One label per image, drawn above it (data: shown literally).
        name: A line naming what is shown (data).
        columns: Images per row (default: all in one row, at most 8).
        value_range: Pixel values drawn as black and white (default: [0, 1] when the
            values are in it, else each image's min and max).
        channels_last: Force the channel axis (see :func:`as_images`).
        max_cells: Cells per image before blocks of pixels are pooled (block means).
        max_bytes: Budget of the spec.

    Example:
        >>> x = np.random.default_rng(0).random((2, 3, 8, 8))
        >>> spec = wa.viz.images(x, ["a", "b"]).to_dict()
        >>> spec["usermeta"]["weightatlas"]["grid"]
        [8, 8]
    """
    x, _ = as_images(images, "images", channels_last=channels_last)
    unit, note = to_unit(x, value_range, "images")
    n, h, w = x.shape[:3]
    if labels is not None and len(labels) != n:
        raise ShapeError(f"images: {len(labels)} labels for {n} images")
    cols = min(n, 8) if columns is None else max(1, int(columns))

    def build(cells: int) -> alt.VConcatChart:
        import altair as alt

        f = image_factor(h, w, cells)
        data, grid = pixel_columns(unit, f)
        size = _panel(h, w)
        charts: list[Any] = []
        for i in range(n):
            panel: Any = image_panel(grid, (h, w), f, size, f"datum.n == {i}")
            if labels is not None:
                panel = alt.layer(panel, label_layer(str(labels[i])))
            charts.append(panel)
        rows = [alt.hconcat(*charts[r:r + cols], spacing=8) for r in range(0, n, cols)]
        lines = [("name", name)] if name else []
        pooled = f"pooled in {f}×{f} blocks (means) to {dims(grid)} cells" if f > 1 else \
            "one cell per pixel"
        lines.append(("info", f"{n} image{'s' if n > 1 else ''} of {dims((h, w))} pixels, "
                              f"{pooled}; {note}"))
        body = alt.vconcat(*rows, spacing=12)
        values, fields = inline_values(data)
        return alt.vconcat(
            header_chart(lines), body, spacing=4, data=values,
        ).transform_flatten(fields).properties(usermeta={"weightatlas": {
            "view": "images", "shape": [n, h, w, x.shape[3]], "grid": list(grid),
            "block": [f, f]}})

    return fit_budget(build, max_cells, max_bytes, "images")  # type: ignore[return-value]


def _panel(h: int, w: int, target: int = 160) -> tuple[int, int]:
    scale = max(1.0, target / max(h, w)) if max(h, w) < target else target / max(h, w)
    return max(8, round(w * scale)), max(8, round(h * scale))


def image_panel(grid: tuple[int, int], shape: tuple[int, int], factor: int,
                size: tuple[int, int], where: str, color: Any = None) -> alt.Chart:
    """One image's pixels from the shared columns (rows where ``where`` holds), in pixel
    coordinates (y down), coloured by the hex column ``c`` unless ``color`` is given."""
    import altair as alt

    h, w = shape
    none = None
    chart = alt.Chart().transform_filter(where).transform_calculate(
        x0=f"datum.gx * {factor}", x1=f"min(datum.gx * {factor} + {factor}, {w})",
        y0=f"datum.gy * {factor}", y1=f"min(datum.gy * {factor} + {factor}, {h})",
    ).mark_rect(strokeWidth=0).encode(
        x=alt.X("x0:Q", scale=alt.Scale(domain=[0, w], nice=False, zero=False), axis=none,
                title=None),
        x2=alt.X2("x1:Q"),
        y=alt.Y("y0:Q", scale=alt.Scale(domain=[0, h], nice=False, zero=False, reverse=True),
                axis=none, title=None),
        y2=alt.Y2("y1:Q"),
        color=color if color is not None else alt.Color("c:N", scale=None),
    ).properties(width=size[0], height=size[1])
    return chart


def label_layer(text: str) -> alt.Chart:
    """A text drawn above a panel, from its own one-row dataset (so it stays data)."""
    import altair as alt

    return inline_data({"text": [text]}).mark_text(
        align="left", baseline="bottom", dy=-3, fontSize=10, color="#333333", limit=300,
    ).encode(text=alt.Text("text:N"), x=alt.XValue(0), y=alt.YValue(0))
