"""The conventions every chart shares: colours, the theme, inline data, headers, size budget.

Untrusted strings (tensor names, anything read from a model file) only ever travel inside
``data.values``: the chart's data is one JSON text (parsed by Vega with ``JSON.parse``, never
evaluated), and everything else in a spec (titles, expressions, formats, tooltips' titles)
comes from fixed templates and numbers. See :func:`inline_data`.
"""

from __future__ import annotations

import contextvars
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import numpy as np

from weightatlas.errors import ResourceLimitError

if TYPE_CHECKING:
    import altair as alt

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_CELLS",
    "DISTILL_COLORS",
    "NONFINITE_COLOR",
    "SEQUENTIAL_SCHEME",
    "THEME",
    "register_theme",
    "theme_config",
]

#: The diverging scale of the Distill article "Visualizing Weights" (ColorBrewer RdBu, 5
#: stops at -1, -0.5, 0, 0.5, 1, interpolated linearly in RGB): negative blue, positive red.
DISTILL_COLORS = ("#0571B0", "#92C5DE", "#F7F7F7", "#F4A582", "#CA0020")
#: Colour of cells that hold NaN or ±Inf.
NONFINITE_COLOR = "#000000"
#: Sequential scheme for magnitudes, counts and statistics.
SEQUENTIAL_SCHEME: Final = "viridis"
#: Colours of header lines: the name, facts, and warnings (non-finite values).
_TEXT, _MUTED, _ALERT = "#111111", "#555555", "#B00020"
#: Default size budget of one chart spec, in bytes of JSON.
DEFAULT_MAX_BYTES = 1_000_000
#: Default number of cells a heatmap shows before it pools blocks (below Altair's 5000 rows).
DEFAULT_MAX_CELLS = 4096
#: Name of the registered Altair theme.
THEME = "weightatlas"

_SAFE_AXIS = re.compile(r"[A-Za-z0-9_]{1,24}")
#: Bytes of the inline data written while a chart is being built (see :func:`fit_budget`).
_DATA_BYTES: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "weightatlas_data_bytes", default=None)
#: Upper bound of a spec's bytes besides its inline data (templates, scales, headers);
#: tests/test_viz_charts.py checks every view stays under it.
TEMPLATE_BYTES = 40_000


def _count(text: str) -> None:
    acc = _DATA_BYTES.get()
    if acc is not None:
        acc[0] += len(json.dumps(text))  # as it will be escaped inside the spec


def theme_config() -> dict[str, Any]:
    """The ``config`` of the weightatlas theme: the Distill diverging range, a sequential
    ramp, quiet axes and left-aligned titles.

    Example:
        >>> theme_config()["range"]["diverging"][0]
        '#0571B0'
    """
    return {
        "view": {"continuousWidth": 300, "continuousHeight": 300, "stroke": "#dddddd"},
        "range": {"diverging": list(DISTILL_COLORS), "heatmap": {"scheme": SEQUENTIAL_SCHEME},
                  "ramp": {"scheme": SEQUENTIAL_SCHEME}},
        "axis": {"labelFontSize": 10, "titleFontSize": 11, "titleFontWeight": "normal",
                 "gridColor": "#eeeeee", "domainColor": "#888888", "tickColor": "#888888"},
        "legend": {"labelFontSize": 10, "titleFontSize": 11, "titleFontWeight": "normal",
                   "gradientLength": 160},
        "header": {"labelFontSize": 10, "titleFontSize": 11, "titleFontWeight": "normal"},
        "title": {"anchor": "start", "fontSize": 13, "fontWeight": "bold"},
        "font": "Helvetica, Arial, sans-serif",
    }


_REGISTERED: list[bool] = []


def register_theme() -> None:
    """Register the ``weightatlas`` Altair theme; enable it unless another theme is active.

    Every chart builder calls this, so in a notebook the charts display with the theme
    as soon as one is built. ``alt.theme.enable("default")`` turns it off again. Specs do
    not depend on it: each chart carries its own scales.

    Example:
        >>> import altair as alt
        >>> register_theme()
        >>> "weightatlas" in alt.theme.names()
        True
    """
    import altair as alt

    if not _REGISTERED:
        # alt.theme.names() reads package entry points (~5 ms a call): once is enough.
        if THEME not in alt.theme.names():
            def _theme() -> alt.theme.ThemeConfig:
                return cast("alt.theme.ThemeConfig", {"config": theme_config()})

            alt.theme.register(THEME, enable=False)(_theme)
        _REGISTERED.append(True)
    if alt.theme.active == "default":
        alt.theme.enable(THEME)


# ---- scales ----------------------------------------------------------------------------------


def symmetric_extent(values: np.ndarray, given: float | None = None) -> float:
    """Half-width ``m`` of the zero-centred domain ``[-m, m]``: ``given``, or the largest
    finite magnitude in ``values`` (1 when there is none, so a zero tensor still draws)."""
    if given is not None:
        if not (math.isfinite(given) and given > 0):
            raise ValueError(f"domain must be a positive finite number, got {given}")
        return float(given)
    v = np.asarray(values, np.float64)
    v = np.abs(v[np.isfinite(v)])
    m = float(v.max()) if v.size else 0.0
    return m if m > 0 else 1.0


def diverging_scale(m: float) -> alt.Scale:
    """The Distill scale on ``[-m, m]``: five stops, linear RGB, values outside clamped."""
    import altair as alt

    return alt.Scale(domain=[-m, -m / 2, 0.0, m / 2, m], range=list(DISTILL_COLORS),
                     interpolate="rgb", clamp=True)


def diverging_color(field: str, m: float, title: str) -> Any:
    """Colour by ``field`` on the Distill scale; cells whose value is null (NaN, ±Inf, or a
    block holding one) drawn in :data:`NONFINITE_COLOR`."""
    import altair as alt

    return alt.condition(f"!isValid(datum.{field}) || datum.nf > 0",
                         alt.ColorValue(NONFINITE_COLOR),
                         alt.Color(f"{field}:Q", scale=diverging_scale(m), title=title,
                                   legend=alt.Legend(format=".3~g")))


# ---- numbers and data ---------------------------------------------------------------------


def numbers(values: np.ndarray | Sequence[float], exact32: bool = False) -> list[float | None]:
    """Floats for JSON: NaN and ±Inf become null; ``exact32`` rounds to the float32 value's
    shortest decimal (exact for float32 and narrower tensors, and half the bytes)."""
    a = np.asarray(values, np.float64)
    if exact32:
        with np.errstate(over="ignore"):
            a = a.astype(np.float32).astype(str).astype(np.float64)
    out: list[float | None] = a.tolist()
    bad = ~np.isfinite(a)
    if bad.any():
        for i in np.flatnonzero(bad).tolist():
            out[i] = None
    return out


def inline_values(columns: Mapping[str, Sequence[Any] | np.ndarray],
                  ) -> tuple[alt.InlineData, list[Any]]:
    """Columnar data held as one JSON text in ``data.values``, and the fields to flatten.

    The JSON text is ``[{"col": [...], ...}]``; a ``flatten`` transform on the fields turns it
    into rows. Vega parses it with ``JSON.parse`` (no code is generated from it), Altair does
    not walk it value by value (a 4096-cell chart builds in milliseconds), and names stay
    data.
    """
    import altair as alt

    cols: dict[str, list[Any]] = {}
    n = None
    for key, col in columns.items():
        values = col.tolist() if isinstance(col, np.ndarray) else list(col)
        if n is not None and len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values, expected {n}")
        n = len(values)
        cols[key] = values
    text = json.dumps([cols], separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    _count(text)
    return alt.InlineData(values=text, format=alt.DataFormat(type="json")), list(cols)


def inline_data(columns: Mapping[str, Sequence[Any] | np.ndarray]) -> alt.Chart:
    """A chart over :func:`inline_values` data, flattened into rows."""
    import altair as alt

    data, fields = inline_values(columns)
    return alt.Chart(data).transform_flatten(fields)


def inline_rows(rows: Sequence[Mapping[str, Any]]) -> alt.InlineData:
    """Row data (for a lookup) held as one JSON text in ``data.values``."""
    import altair as alt

    text = json.dumps(list(rows), separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    _count(text)
    return alt.InlineData(values=text, format=alt.DataFormat(type="json"))


_LINE = 15  # pixels per header line


def header_layers(lines: Sequence[tuple[str, str]], top: int = 8) -> list[alt.Chart]:
    """Text layers drawn above a chart: ``(style, text)`` lines with style ``name``, ``info``
    or ``alert``, one layer per run of lines of one style (a multi-line text). The texts are
    data, so a tensor name is shown literally."""
    import altair as alt

    styles: dict[str, tuple[int, Any, str]] = {
        "name": (13, "bold", _TEXT), "info": (11, "normal", _MUTED),
        "alert": (11, "bold", _ALERT)}
    runs: list[tuple[str, list[str], int]] = []
    for i, (style, text) in enumerate(lines):
        if runs and runs[-1][0] == style:
            runs[-1][1].append(text)
        else:
            runs.append((style, [text], i))
    height = len(lines) * _LINE
    layers = []
    for style, texts, first in runs:
        size, weight, color = styles[style]
        layers.append(inline_data({"text": [texts]}).mark_text(
            align="left", baseline="top", fontSize=size, fontWeight=weight, color=color,
            lineHeight=_LINE, limit=900,
        ).encode(text=alt.Text("text:N"), x=alt.XValue(0),
                 y=alt.YValue(-top - height + first * _LINE)))
    return layers


def header_chart(lines: Sequence[tuple[str, str]]) -> alt.LayerChart:
    """A chart of only the header lines, to stack above a faceted or concatenated chart."""
    import altair as alt

    height = len(lines) * _LINE
    return cast("alt.LayerChart", alt.layer(*header_layers(lines, top=-height - 2)).properties(
        width=10, height=1, view=alt.ViewConfig(stroke=None)))


def axis_name(layout: Sequence[str], axis: int) -> str:
    """A layout axis name fit for an axis title (``out``, ``in``...), or ``d<axis>`` when the
    name could carry anything (it came from a file)."""
    if axis < len(layout) and _SAFE_AXIS.fullmatch(layout[axis]):
        return layout[axis]
    return f"d{axis}"


def spec_bytes(chart: alt.TopLevelMixin) -> int:
    """Bytes of the chart's Vega-Lite JSON (compact, as exported)."""
    return len(json.dumps(chart.to_dict(validate=False), separators=(",", ":")))


def fit_budget(build: Callable[[int], alt.TopLevelMixin], cells: int, max_bytes: int,
               what: str) -> alt.TopLevelMixin:
    """Build a chart with ``cells`` cells, shrinking the cell budget until its spec fits in
    ``max_bytes``.

    Raises:
        ResourceLimitError: Even a small chart does not fit.
    """
    register_theme()
    for _ in range(6):
        acc = [0]
        token = _DATA_BYTES.set(acc)
        try:
            chart = build(cells)
        finally:
            _DATA_BYTES.reset(token)
        if acc[0] + TEMPLATE_BYTES <= max_bytes:  # surely fits: skip serialising it
            return chart
        size = spec_bytes(chart)
        if size <= max_bytes:
            return chart
        if cells <= 1:
            break
        cells = max(1, min(cells - 1, int(cells * max_bytes / size * 0.9)))
    raise ResourceLimitError(f"{what}: the smallest chart spec is {size} bytes, over the "
                             f"budget of max_bytes={max_bytes}; raise max_bytes")


def fmt(v: float | None) -> str:
    """A number for a header line (4 significant digits)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4g}"


def dims(shape: Sequence[int]) -> str:
    """``64×32`` for a shape (``scalar`` for 0-d)."""
    return "×".join(str(int(d)) for d in shape) or "scalar"
