"""Computations against the store: comparisons, spectra, projections, factors, trajectories.

The core layer reads :mod:`weightatlas.storage` snapshots and returns Arrow tables or
NumPy arrays with documented columns; it never imports adapters, charts or the CLI.
"""

from __future__ import annotations

# Models rebuilt from the store (the ONNX graph attached to a snapshot)
from weightatlas.core._onnx_model import graph_table, load_graph, load_model

# Spectra of weight matrices
from weightatlas.core._powerlaw import EVALS_THRESHOLD, PowerLawFit, fit_power_law

# Comparing snapshots, across frameworks
from weightatlas.core.compare import PAIR_SCHEMA, Comparison, PairStats, align, compare, diff

# The differentiable executor (ONNX graphs as JAX functions) and attributions
from weightatlas.core.executor import (
    OnnxFunction,
    StoredFunction,
    ValueSpec,
    from_onnx,
    from_snapshot,
    grad_cam,
    gradient,
    gradient_x_input,
    ig_steps,
    integrated_gradients,
    layer_output,
    occlusion,
    onnx_backend,
    saliency,
    smoothgrad,
    smoothgrad_noise,
    stored_gradients,
    supported_operators,
    weight_gradient_snapshot,
    weight_gradients,
)

# Factors and connections (Distill "Visualizing Weights")
from weightatlas.core.factors import FamilyFactors, neuron_rgb, one_sided_nmf, rank_connections

# Projections
from weightatlas.core.projection import neuron_rows, pca, project, projection, trajectory_pca
from weightatlas.core.spectrum import (
    MATRIX_KINDS,
    SPECTRUM_SCHEMA,
    MatrixSpectrum,
    eigenvalues,
    marchenko_pastur_density,
    matrix_spectrum,
    spectrum,
    weight_matrices,
)

# Training trajectories
from weightatlas.core.trajectory import TRAJECTORY_SCHEMA, trajectory

__all__ = [
    # The differentiable executor and attributions
    "OnnxFunction",
    "StoredFunction",
    "ValueSpec",
    "from_onnx",
    "from_snapshot",
    "grad_cam",
    "gradient",
    "gradient_x_input",
    "ig_steps",
    "integrated_gradients",
    "layer_output",
    "occlusion",
    "onnx_backend",
    "saliency",
    "smoothgrad",
    "smoothgrad_noise",
    "stored_gradients",
    "supported_operators",
    "weight_gradient_snapshot",
    "weight_gradients",
    # Models rebuilt from the store
    "graph_table",
    "load_graph",
    "load_model",
    # Comparing snapshots
    "PAIR_SCHEMA",
    "Comparison",
    "PairStats",
    "align",
    "compare",
    "diff",
    # Spectra of weight matrices
    "EVALS_THRESHOLD",
    "MATRIX_KINDS",
    "SPECTRUM_SCHEMA",
    "MatrixSpectrum",
    "PowerLawFit",
    "eigenvalues",
    "fit_power_law",
    "marchenko_pastur_density",
    "matrix_spectrum",
    "spectrum",
    "weight_matrices",
    # Projections
    "neuron_rows",
    "pca",
    "project",
    "projection",
    "trajectory_pca",
    # Factors and connections
    "FamilyFactors",
    "neuron_rgb",
    "one_sided_nmf",
    "rank_connections",
    # Training trajectories
    "TRAJECTORY_SCHEMA",
    "trajectory",
]
