"""Charts: Distill-style Altair views of any tensor, bounded in size, and the model report.

Every builder takes store data (a :class:`~weightatlas.storage.Snapshot` and a tensor name,
an array, or an Arrow table) and returns an un-rendered Altair chart that can be restyled,
composed, displayed in a notebook, or exported with :func:`save` (Vega-Lite, Vega, SVG,
PNG, offline HTML). Weights use the diverging scale of the Distill article "Visualizing
Weights" centred on zero; large tensors are pooled in blocks, never sampled, and no spec
exceeds ``max_bytes`` (1 MB by default). Tensor names are data: they appear literally and
run nothing, in the charts and in the report.

Example:
    >>> chart = wa.viz.heatmap(np.eye(3, dtype=np.float32), "w")
    >>> wa.viz.to_png(chart)[:4]
    b'\\x89PNG'
"""

from __future__ import annotations

# Analyses: spectra, projections, trajectories, factors
from weightatlas.viz._analyses import ALPHA_BAND, alphas, esd

# Comparing two snapshots
from weightatlas.viz._compare import agreement, diff, scatter

# Contextualized weights (feature visualizations around the weights)
from weightatlas.viz._context import NORMALIZATIONS, contextualized

# Views of weights
from weightatlas.viz._dist import finite_moments, histogram, ridgeline

# Expanded weights (through the layers between two layers)
from weightatlas.viz._expanded import expanded

# Export
from weightatlas.viz._export import (
    FORMATS,
    format_of,
    javascript_versions,
    save,
    script_json,
    to_html,
    to_png,
    to_svg,
    to_vega,
    to_vega_lite,
)

# Analyses: NMF factors
from weightatlas.viz._factors import factors_chart, nmf_rgb

# Views of weights, comparisons and analyses (continued)
from weightatlas.viz._heatmap import AGGREGATIONS, heatmap

# Images and attributions
from weightatlas.viz._images import images
from weightatlas.viz._kernels import kernels, rank_inputs
from weightatlas.viz._overview import OVERVIEW_COLUMNS, overview, overview_table
from weightatlas.viz._pairs import ALIGNMENT_COLUMNS, align_by_name, compare
from weightatlas.viz._projections import (
    TRAJECTORY_METRICS,
    projection_chart,
    trajectory_chart,
    trajectory_path,
)

# Reductions behind the charts
from weightatlas.viz._reduce import (
    BlockStats,
    Histogram,
    PairStats,
    as_float,
    block_grid,
    block_reduce,
    histogram_counts,
    joint_histogram,
    pair_stats,
)

# The report
from weightatlas.viz._report import DEFAULT_REPORT_BYTES, report_html, save_report

# Images and attributions (continued)
from weightatlas.viz._saliency import saliency_overlay, saliency_strip

# Conventions
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_CELLS,
    DISTILL_COLORS,
    NONFINITE_COLOR,
    SEQUENTIAL_SCHEME,
    THEME,
    register_theme,
    theme_config,
)

# Views by name
from weightatlas.viz._views import VIEWS, ViewInfo, chart

__all__ = [
    # Views of weights
    "AGGREGATIONS",
    "OVERVIEW_COLUMNS",
    "expanded",
    "finite_moments",
    "heatmap",
    "histogram",
    "kernels",
    "overview",
    "overview_table",
    "rank_inputs",
    "ridgeline",
    # Analyses: spectra, projections, trajectories, factors
    "ALPHA_BAND",
    "TRAJECTORY_METRICS",
    "alphas",
    "esd",
    "factors_chart",
    "nmf_rgb",
    "projection_chart",
    "trajectory_chart",
    "trajectory_path",
    # Images and attributions
    "NORMALIZATIONS",
    "contextualized",
    "images",
    "saliency_overlay",
    "saliency_strip",
    # Comparing two snapshots
    "ALIGNMENT_COLUMNS",
    "agreement",
    "align_by_name",
    "compare",
    "diff",
    "scatter",
    # Views by name (the CLI's)
    "VIEWS",
    "ViewInfo",
    "chart",
    # Export and report
    "DEFAULT_REPORT_BYTES",
    "FORMATS",
    "format_of",
    "javascript_versions",
    "report_html",
    "save",
    "save_report",
    "script_json",
    "to_html",
    "to_png",
    "to_svg",
    "to_vega",
    "to_vega_lite",
    # Reductions behind the charts
    "BlockStats",
    "Histogram",
    "PairStats",
    "as_float",
    "block_grid",
    "block_reduce",
    "histogram_counts",
    "joint_histogram",
    "pair_stats",
    # Conventions
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_CELLS",
    "DISTILL_COLORS",
    "NONFINITE_COLOR",
    "SEQUENTIAL_SCHEME",
    "THEME",
    "register_theme",
    "theme_config",
]
