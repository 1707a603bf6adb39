"""NMF of weights and connection ranking: the Distill "Visualizing Weights" views.

- :func:`neuron_rgb`: one neuron's input weights ``[in, h, w]`` reduced to three
  non-negative factors over the channels and shown as an RGB image of the kernel (the
  article's first figure). The sign is split along the channel axis first,
  ``X = [relu(W), relu(-W)]`` with rows = spatial positions and ``2 * in`` columns,
  as the Captum port does; factors are refitted per neuron, so colours are not
  comparable across neurons.
- :func:`one_sided_nmf`: a family of units ``[units, channels, (h, w)]`` factored into
  ``k`` non-negative *channel* factors and signed *spatial* factors (the High-Low
  Frequency Detectors definition): the sign is split along the unit axis,
  ``P = [relu(E); relu(-E)]``, ``P`` is flattened to rows = (unit, sign, position)
  and columns = channels, NMF gives ``U H`` with ``H >= 0`` (channel factors), and the
  spatial factors are ``S = U[:n] - U[n:]``, so ``E ~ S H``. The relative
  reconstruction error ``||E - S H||_F / ||E||_F`` is reported.
- :func:`rank_connections`: an output neuron's inputs ranked by the L2 norm of their
  spatial kernels, ``||W[o, i, :, :]||_2`` (``|W[o, i]|`` for a linear weight), the
  top ``k`` or all above a fraction of the maximum (Early Vision shows those above
  30%). ``direction="forward"`` ranks the outputs fed by an input neuron instead.

NMF is scikit-learn's (coordinate descent, NNDSVDa initialisation, fixed seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from weightatlas.errors import ShapeError, UnsupportedError

__all__ = ["FamilyFactors", "neuron_rgb", "one_sided_nmf", "rank_connections"]


def _nmf(x: np.ndarray, k: int, seed: int, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    import warnings

    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    model = NMF(n_components=k, init="nndsvda", random_state=seed, max_iter=max_iter,
                tol=1e-6)
    with warnings.catch_warnings():
        # Reaching max_iter is reported through the reconstruction error instead.
        warnings.simplefilter("ignore", ConvergenceWarning)
        u = model.fit_transform(x)
    return u, model.components_


def _finite(w: np.ndarray, name: str) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if not np.isfinite(w).all():
        raise ShapeError(f"tensor {name!r}: NMF needs finite weights, found "
                         f"{int((~np.isfinite(w)).sum())} NaN/Inf values")
    return w


def neuron_rgb(weight: np.ndarray, neuron: int, *, seed: int = 0, max_iter: int = 1000,
               name: str = "weight") -> np.ndarray:
    """One neuron's kernel as an RGB image ``[h, w, 3]`` in ``[0, 1]`` (3-factor NMF).

    Args:
        weight: A convolution weight ``[out, in, h, w]``.
        neuron: The output neuron.

    Example:
        >>> w = np.random.default_rng(0).standard_normal((4, 8, 5, 5))
        >>> rgb = neuron_rgb(w, 2)
        >>> rgb.shape, float(rgb.max())
        ((5, 5, 3), 1.0)
    """
    if weight.ndim != 4:
        raise ShapeError(f"tensor {name!r}: per-neuron NMF needs a conv weight "
                         f"[out, in, h, w], got shape {list(weight.shape)}")
    if not 0 <= neuron < weight.shape[0]:
        raise ShapeError(f"tensor {name!r}: neuron {neuron} is outside 0..{weight.shape[0] - 1}")
    w = _finite(weight[neuron], name)  # [in, h, w]
    c, h, wd = w.shape
    x = np.concatenate([np.maximum(w, 0), np.maximum(-w, 0)]).reshape(2 * c, h * wd).T
    k = min(3, x.shape[0], x.shape[1])
    u, _ = _nmf(x, k, seed, max_iter) if x.any() else (np.zeros((h * wd, k)), None)
    rgb = np.zeros((h * wd, 3))
    rgb[:, :k] = u
    peak = rgb.max()
    return (rgb / peak if peak > 0 else rgb).reshape(h, wd, 3)


@dataclass(frozen=True)
class FamilyFactors:
    """The result of :func:`one_sided_nmf`."""

    channel: np.ndarray  #: ``[k, channels]``, non-negative
    spatial: np.ndarray  #: ``[units, k, h, w]`` (``[units, k, 1, 1]`` for a linear family)
    relative_error: float  #: ``||E - S H||_F / ||E||_F``

    def reconstruct(self) -> np.ndarray:
        """``S H`` in the family's ``[units, channels, h, w]`` layout."""
        return np.einsum("ukyx,kc->ucyx", self.spatial, self.channel)

    def table(self) -> pa.Table:
        """The channel factors as a long table: ``factor``, ``channel``, ``loading``."""
        k, c = self.channel.shape
        return pa.table({"factor": np.repeat(np.arange(k), c), "channel": np.tile(np.arange(c), k),
                         "loading": self.channel.reshape(-1)})


def one_sided_nmf(family: np.ndarray, n_factors: int, *, seed: int = 0, max_iter: int = 2000,
                  name: str = "weight") -> FamilyFactors:
    """Factor a family of weights into non-negative channel and signed spatial factors.

    Args:
        family: ``[units, channels, h, w]`` (conv weights, expanded weights) or
            ``[units, channels]`` (a linear weight); units are the rows to explain.
        n_factors: Number of factors ``k`` (the user's choice).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> f = one_sided_nmf(rng.random((6, 2)) @ rng.random((2, 10)), 2)
        >>> f.channel.shape, f.spatial.shape, f.relative_error < 1e-3
        ((2, 10), (6, 2, 1, 1), True)
    """
    if family.ndim == 2:
        family = family[:, :, None, None]
    if family.ndim != 4:
        raise ShapeError(f"tensor {name!r}: a weight family is [units, channels] or "
                         f"[units, channels, h, w], got shape {list(family.shape)}")
    if n_factors < 1:
        raise UnsupportedError(f"n_factors must be at least 1, got {n_factors}")
    e = _finite(family, name)
    n, c, h, w = e.shape
    p = np.concatenate([np.maximum(e, 0), np.maximum(-e, 0)])  # [2n, c, h, w]
    x = p.transpose(0, 2, 3, 1).reshape(2 * n * h * w, c)
    if not x.any():
        raise ShapeError(f"tensor {name!r}: every weight is zero; nothing to factor")
    u, hmat = _nmf(x, n_factors, seed, max_iter)
    u = u.reshape(2 * n, h, w, n_factors)
    spatial = (u[:n] - u[n:]).transpose(0, 3, 1, 2)
    result = FamilyFactors(hmat, spatial, 0.0)
    norm = float(np.linalg.norm(e))
    error = float(np.linalg.norm(e - result.reconstruct())) / norm
    return FamilyFactors(hmat, spatial, error)


def rank_connections(weight: np.ndarray, neuron: int, *, top_k: int | None = None,
                     min_fraction: float | None = None, direction: str = "backward",
                     name: str = "weight") -> pa.Table:
    """Rank the connections of one neuron by the L2 norm of their kernels.

    Args:
        weight: ``[out, in, *spatial]`` or ``[out, in]``.
        neuron: An output neuron (``backward``: rank its inputs) or an input neuron
            (``forward``: rank the outputs it feeds).
        top_k: Keep the ``k`` strongest.
        min_fraction: Keep those with at least this fraction of the strongest's norm.

    Returns:
        ``rank``, ``neuron`` (the connected neuron), ``l2``, ``fraction`` (of the
        maximum), ``mean`` (the kernel's mean: excitatory > 0, inhibitory < 0).

    Example:
        >>> w = np.zeros((2, 3, 1, 1)); w[0, :, 0, 0] = [0.1, -2.0, 1.0]
        >>> rank_connections(w, 0).column("neuron").to_pylist()
        [1, 2, 0]
    """
    if weight.ndim < 2:
        raise ShapeError(f"tensor {name!r}: connection ranking needs [out, in, ...], got shape "
                         f"{list(weight.shape)}")
    if direction not in ("backward", "forward"):
        raise UnsupportedError(f"direction must be 'backward' or 'forward', got {direction!r}")
    w = np.asarray(weight, dtype=np.float64)
    axis = 0 if direction == "backward" else 1
    if not 0 <= neuron < w.shape[axis]:
        raise ShapeError(f"tensor {name!r}: neuron {neuron} is outside 0..{w.shape[axis] - 1} "
                         f"({direction})")
    kernels = w[neuron] if axis == 0 else w[:, neuron]
    kernels = kernels.reshape(kernels.shape[0], -1)
    l2 = np.sqrt((kernels**2).sum(axis=1))
    order = np.argsort(-l2, kind="stable")
    peak = float(l2.max()) if l2.size else 0.0
    fraction = l2 / peak if peak > 0 else np.zeros_like(l2)
    keep = order
    if min_fraction is not None:
        keep = keep[fraction[keep] >= min_fraction]
    if top_k is not None:
        keep = keep[:top_k]
    return pa.table({
        "rank": np.arange(1, keep.size + 1), "neuron": keep.astype(np.int64),
        "l2": l2[keep], "fraction": fraction[keep], "mean": kernels[keep].mean(axis=1),
    })
