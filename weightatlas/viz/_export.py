"""Exporting charts: Vega-Lite JSON, compiled Vega JSON, SVG, PNG (vl-convert, no browser),
and standalone HTML that renders offline.

The HTML inlines the vega, vega-lite and vega-embed JavaScript that vl-convert-python
bundles (pinned by its version), puts each spec in a ``<script type="application/json">``
block with ``<``, ``>``, ``&``, U+2028 and U+2029 escaped (so no ``</script`` can end it),
and runs under a Content-Security-Policy that allows only its own nonce'd scripts and no
``eval``: charts are drawn with Vega's expression interpreter (vega-embed ``ast: true``).
"""

from __future__ import annotations

import functools
import html
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightatlas.errors import UnsafeInputError, UnsupportedError
from weightatlas.viz._style import THEME, register_theme

if TYPE_CHECKING:
    import altair as alt

__all__ = [
    "FORMATS",
    "chart_div",
    "format_of",
    "page",
    "javascript_versions",
    "save",
    "script_json",
    "to_html",
    "to_png",
    "to_svg",
    "to_vega",
    "to_vega_lite",
]

#: File suffixes :func:`save` understands, and what each writes.
FORMATS = {
    ".vl.json": "Vega-Lite JSON",
    ".vg.json": "Vega JSON (compiled)",
    ".json": "Vega-Lite JSON",
    ".html": "standalone HTML (JavaScript inlined, renders offline)",
    ".svg": "SVG",
    ".png": "PNG",
}


def _vl_version() -> str:
    """The Vega-Lite version Altair writes (``6.4``), if vl-convert has it; else its latest."""
    import altair as alt
    import vl_convert as vlc

    major_minor = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    known = list(vlc.get_vegalite_versions())
    return major_minor if major_minor in known else known[-1]


def javascript_versions() -> dict[str, str]:
    """Versions of the JavaScript libraries the HTML exports inline.

    Example:
        >>> sorted(javascript_versions())
        ['vega', 'vega-embed', 'vega-lite']
    """
    import vl_convert as vlc

    return {"vega": vlc.get_vega_version(), "vega-lite": _vl_version(),
            "vega-embed": vlc.get_vega_embed_version()}


@functools.lru_cache(maxsize=2)
def _bundle(version: str) -> str:
    import vl_convert as vlc

    code: str = vlc.javascript_bundle(vl_version=version)  # type: ignore[call-arg]
    lowered = code.lower()
    if "</script" in lowered or "<!--" in lowered or "<script" in lowered:
        raise UnsafeInputError("the vl-convert JavaScript bundle contains '</script', "
                               "'<script' or '<!--' and cannot be inlined safely")
    return code


def to_vega_lite(chart: alt.TopLevelMixin) -> dict[str, Any]:
    """The chart's Vega-Lite spec (a dict), with the weightatlas theme's config unless
    another theme is active.

    Example:
        >>> spec = wa.viz.to_vega_lite(wa.viz.heatmap(np.eye(2), "w"))
        >>> spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
        True
    """
    import altair as alt

    register_theme()
    if alt.theme.active == "default":
        with alt.theme.enable(THEME):
            return chart.to_dict()
    return chart.to_dict()


def _spec(chart: alt.TopLevelMixin | Mapping[str, Any]) -> dict[str, Any]:
    return dict(chart) if isinstance(chart, Mapping) else to_vega_lite(chart)


def _convert(what: str, fn: Any, spec: dict[str, Any], **kwargs: Any) -> Any:
    try:
        return fn(spec, vl_version=_vl_version(), **kwargs)
    except ValueError as e:
        raise UnsupportedError(f"vl-convert cannot turn this chart into {what}: {e}") from e


def to_vega(chart: alt.TopLevelMixin | Mapping[str, Any]) -> dict[str, Any]:
    """The chart compiled to a Vega spec (a dict).

    Example:
        >>> "marks" in wa.viz.to_vega(wa.viz.heatmap(np.eye(2), "w"))
        True
    """
    import vl_convert as vlc

    out: dict[str, Any] = _convert("Vega", vlc.vegalite_to_vega, _spec(chart))
    return out


def to_svg(chart: alt.TopLevelMixin | Mapping[str, Any]) -> str:
    """The chart rendered to SVG text.

    Example:
        >>> wa.viz.to_svg(wa.viz.heatmap(np.eye(2), "w")).startswith("<svg")
        True
    """
    import vl_convert as vlc

    out: str = _convert("SVG", vlc.vegalite_to_svg, _spec(chart))
    return out


def to_png(chart: alt.TopLevelMixin | Mapping[str, Any], *, scale: float = 2.0) -> bytes:
    """The chart rendered to PNG bytes (``scale`` 2: sharp on high-density screens).

    Example:
        >>> wa.viz.to_png(wa.viz.heatmap(np.eye(2), "w"))[:4]
        b'\\x89PNG'
    """
    import vl_convert as vlc

    out: bytes = _convert("PNG", vlc.vegalite_to_png, _spec(chart), scale=scale)
    return out


def script_json(value: Any) -> str:
    """JSON for inside a ``<script>`` element: ``<``, ``>``, ``&``, U+2028 and U+2029 are
    ``\\u`` escapes, so the text can never close the element or open a comment.

    Example:
        >>> script_json({"name": "</script>"})
        '{"name":"\\\\u003c/script\\\\u003e"}'
    """
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="generator" content="weightatlas; vega {vega}, vega-lite {vegalite}, vega-embed {embed}">
<title>{title}</title>
<style>{css}</style>
<script nonce="{nonce}">{bundle}</script>
</head>
<body data-renderer="{renderer}">
{body}
{specs}
<script nonce="{nonce}">{app}</script>
</body>
</html>
"""

#: Only this page's nonce'd scripts run (no eval: Vega's interpreter draws), nothing is
#: fetched; vega-embed injects its own style element.
_CSP = ("default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
        "img-src data: blob:")

_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #111; }
.wa-chart { margin: 8px 0 20px; min-height: 40px; }
.wa-chart[data-state="error"] { color: #b00020; }
"""

#: Draws every ``.wa-chart`` whose spec is in ``<script type=application/json id=...>``, lazily
#: (when it comes near the viewport) unless ``data-eager`` is set; records each outcome in
#: ``data-state`` and in ``window.weightatlas`` (``renderAll()`` draws every chart).
_APP = """
(function () {
  "use strict";
  var state = { ok: 0, error: 0, errors: [] };
  var opts = { actions: false, ast: true, renderer: document.body.dataset.renderer || "svg" };
  function draw(el) {
    if (el.dataset.state) { return el._wa || Promise.resolve(); }
    el.dataset.state = "rendering";
    var spec = JSON.parse(document.getElementById(el.dataset.spec).textContent);
    el._wa = vegaEmbed(el, spec, opts).then(function (result) {
      el._view = result.view; el.dataset.state = "ok"; state.ok += 1;
    }).catch(function (e) {
      el.dataset.state = "error"; state.error += 1; state.errors.push(String(e));
      el.textContent = "This chart could not be drawn: " + e;
      console.error(e);
    });
    return el._wa;
  }
  var charts = Array.prototype.slice.call(document.querySelectorAll(".wa-chart"));
  var lazy = [];
  charts.forEach(function (el) {
    if (el.dataset.eager !== undefined) { draw(el); } else { lazy.push(el); }
  });
  if ("IntersectionObserver" in window) {
    var io = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        if (e.isIntersecting) { io.unobserve(e.target); draw(e.target); }
      });
    }, { rootMargin: "600px" });
    lazy.forEach(function (el) { io.observe(el); });
  } else {
    lazy.forEach(draw);
  }
  state.total = charts.length;
  state.renderAll = function () { return Promise.all(charts.map(draw)); };
  window.weightatlas = state;
})();
"""


def page(title: str, body: str, specs: Mapping[str, Mapping[str, Any]], *,
         css: str = "", renderer: str = "svg") -> str:
    """A self-contained HTML page: ``body`` (trusted HTML, names already escaped) whose
    ``<div class="wa-chart" data-spec="ID">`` elements are drawn from ``specs[ID]``."""
    versions = javascript_versions()
    nonce = secrets.token_urlsafe(18)
    blocks = "\n".join(f'<script type="application/json" id="{html.escape(k)}">'
                       f"{script_json(v)}</script>" for k, v in specs.items())
    return _PAGE.format(
        nonce=nonce, csp=_CSP.format(nonce=nonce), title=html.escape(title), css=_CSS + css,
        bundle=_bundle(_vl_version()), body=body, specs=blocks, app=_APP,
        renderer=html.escape(renderer), vega=versions["vega"], vegalite=versions["vega-lite"],
        embed=versions["vega-embed"])


def to_html(chart: alt.TopLevelMixin | Mapping[str, Any], *, title: str = "weightatlas chart",
            renderer: str = "svg") -> str:
    """A standalone HTML page that draws the chart offline (JavaScript inlined).

    Example:
        >>> page_ = wa.viz.to_html(wa.viz.heatmap(np.eye(2), "</script>"))
        >>> page_.count("</script") == page_.count("<script")
        True
    """
    return page(title, '<div class="wa-chart" data-spec="wa-spec-0" data-eager></div>',
                {"wa-spec-0": _spec(chart)}, renderer=renderer)


def format_of(path: str | os.PathLike[str]) -> str:
    """The export format a file name asks for (its suffix, a key of :data:`FORMATS`).

    Raises:
        UnsupportedError: An unknown suffix.

    Example:
        >>> format_of("chart.vg.json"), format_of("Chart.PNG")
        ('.vg.json', '.png')
    """
    name = os.fspath(path).lower()
    suffix = next((s for s in FORMATS if name.endswith(s)), None)
    if suffix is None:
        raise UnsupportedError(f"{os.fspath(path)}: unknown chart format; use one of "
                               f"{', '.join(FORMATS)}")
    return suffix


def save(chart: alt.TopLevelMixin, path: str | os.PathLike[str], *, scale: float = 2.0,
         ) -> Path:
    """Write the chart to ``path`` in the format its suffix names (see :data:`FORMATS`).

    Raises:
        UnsupportedError: An unknown suffix.

    Example:
        >>> out = wa.viz.save(wa.viz.heatmap(np.eye(2), "w"), tmp / "w.vl.json")
        >>> out.name, out.stat().st_size > 100
        ('w.vl.json', True)
    """
    target = Path(path)
    suffix = format_of(target)
    if suffix in (".vl.json", ".json"):
        data: str | bytes = json.dumps(to_vega_lite(chart), indent=1) + "\n"
    elif suffix == ".vg.json":
        data = json.dumps(to_vega(chart), indent=1) + "\n"
    elif suffix == ".html":
        data = to_html(chart)
    elif suffix == ".svg":
        data = to_svg(chart)
    else:
        data = to_png(chart, scale=scale)
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        target.write_bytes(data)
    else:
        target.write_text(data, encoding="utf-8")
    return target


def chart_div(spec_id: str, eager: bool = False) -> str:
    """The placeholder element :func:`page` draws a chart into."""
    return (f'<div class="wa-chart" data-spec="{html.escape(spec_id)}"'
            f'{" data-eager" if eager else ""}></div>')
