"""A differentiable executor for ONNX graphs: any stored model as a pure JAX function.

``from_onnx(model)`` checks the whole graph up front and returns an
:class:`OnnxFunction` whose ``apply(weights, *inputs)`` is pure, so ``jax.jit``,
``jax.grad`` (with respect to inputs or weights) and ``jax.vmap`` apply to it.
The attribution functions (saliency, integrated gradients, SmoothGrad, Grad-CAM,
occlusion, weight gradients) run on it. docs/executor.md lists the operators covered
and the conformance results.
"""

from __future__ import annotations

# The executor
from weightatlas.core.executor._backend import onnx_backend
from weightatlas.core.executor._errors import InputMismatchError, UnsupportedOperatorError
from weightatlas.core.executor._expanded import ExpandedWeights, expanded_weights, layer_value
from weightatlas.core.executor._featurevis import FeatureVisResult, feature_visualization
from weightatlas.core.executor._function import OnnxFunction, from_onnx
from weightatlas.core.executor._gradsnap import (
    GRADIENT_SUFFIX,
    stored_gradients,
    weight_gradient_snapshot,
)
from weightatlas.core.executor._graph import ValueSpec
from weightatlas.core.executor._interpolate import INTERPOLATION_MODES, interpolate
from weightatlas.core.executor._linearize import linearized
from weightatlas.core.executor._occlusion import occlusion
from weightatlas.core.executor._registry import supported_operators
from weightatlas.core.executor._saliency import (
    grad_cam,
    gradient,
    gradient_x_input,
    ig_steps,
    integrated_gradients,
    saliency,
    smoothgrad,
    smoothgrad_noise,
    weight_gradients,
)
from weightatlas.core.executor._stored import StoredFunction, from_snapshot, layer_output

__all__ = [
    # The executor
    "OnnxFunction",
    "ValueSpec",
    "from_onnx",
    "onnx_backend",
    "supported_operators",
    # Stored models (a snapshot's attached graph with its tensors as weights)
    "StoredFunction",
    "from_snapshot",
    "layer_output",
    # Weight gradients of stored models, stored as snapshots
    "GRADIENT_SUFFIX",
    "stored_gradients",
    "weight_gradient_snapshot",
    # Attribution maps resized to the input (Grad-CAM upsampling)
    "INTERPOLATION_MODES",
    "interpolate",
    # Attributions (gradients through the executor; occlusion on onnxruntime)
    "grad_cam",
    "gradient",
    "gradient_x_input",
    "ig_steps",
    "integrated_gradients",
    "occlusion",
    "saliency",
    "smoothgrad",
    "smoothgrad_noise",
    "weight_gradients",
    # Expanded weights (Distill, "Visualizing Weights"): the linearized network's Jacobian
    "ExpandedWeights",
    "expanded_weights",
    "layer_value",
    "linearized",
    # Feature visualization
    "FeatureVisResult",
    "feature_visualization",
    # Errors
    "InputMismatchError",
    "UnsupportedOperatorError",
]
