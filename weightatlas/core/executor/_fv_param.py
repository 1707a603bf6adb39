"""Image parametrizations and the optimizer of feature visualization (Lucid's, in JAX).

- **Fourier parametrization** (Lucid ``lucid/optvis/param/spatial.py: fft_image``): the
  image is ``irfft2(scale * spectrum) / 4`` with
  ``scale = sqrt(h * w) / max(f, 1 / max(h, w)) ** decay_power``, ``f`` the frequency
  magnitude of each coefficient in cycles per pixel. Scaling by ``1 / f`` gives every
  frequency about the same energy, so gradient steps are no longer dominated by high
  frequencies; ``sqrt(h * w)`` makes the map unitary (numpy's ``irfft2`` divides by
  ``h * w``) so pixel learning rates carry over.
- **Colour decorrelation** (Lucid ``lucid/optvis/param/color.py``): the three channels
  are parametrized in a decorrelated colour space and mapped to RGB by the square root of
  ImageNet's colour correlation matrix, :data:`COLOR_CORRELATION_SVD_SQRT`, divided by
  its largest column norm. Inputs with another number of channels use the identity.
- **Sigmoid** maps the result into [0, 1] (Lucid ``to_valid_rgb(sigmoid=True)``).
- **Adam** in plain JAX (Lucid optimizes with ``tf.train.AdamOptimizer(0.05)``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "COLOR_CORRELATION_SVD_SQRT",
    "Adam",
    "adam_init",
    "adam_update",
    "color_matrix",
    "fourier_image",
    "rfft2d_freqs",
    "spectrum_scale",
    "to_rgb",
]

#: Square root of ImageNet's RGB colour correlation matrix (its SVD square root), as
#: Lucid gives it: ``lucid/optvis/param/color.py``, ``color_correlation_svd_sqrt``
#: (github.com/tensorflow/lucid; also Lucent's ``lucent/optvis/param/color.py``).
COLOR_CORRELATION_SVD_SQRT = np.array([[0.26, 0.09, 0.02],
                                       [0.27, 0.00, -0.05],
                                       [0.27, -0.09, 0.03]], np.float32)


def color_matrix(channels: int, decorrelate: bool = True) -> np.ndarray:
    """The ``[channels, channels]`` map from the parametrized colour space to the image's:
    Lucid's normalized decorrelation for 3 channels (``decorrelate=True``), else identity.

    Example:
        >>> round(float(np.linalg.norm(color_matrix(3), axis=0).max()), 6)
        1.0
    """
    if channels == 3 and decorrelate:
        m = COLOR_CORRELATION_SVD_SQRT
        return (m / np.max(np.linalg.norm(m, axis=0))).astype(np.float32)
    return np.eye(channels, dtype=np.float32)


def rfft2d_freqs(h: int, w: int) -> np.ndarray:
    """Frequency magnitude (cycles per pixel) of each coefficient of ``rfft2`` of an
    ``h x w`` image: shape ``[h, w // 2 + 1]``.

    Example:
        >>> rfft2d_freqs(4, 4)[1, 2].round(4)
        np.float64(0.559)
    """
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def spectrum_scale(h: int, w: int, decay_power: float = 1.0) -> np.ndarray:
    """Lucid's scale of each Fourier coefficient: ``sqrt(h w) / max(f, 1/max(h, w))^decay``."""
    freqs = rfft2d_freqs(h, w)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(h, w)) ** decay_power
    return (scale * np.sqrt(h * w)).astype(np.float32)


def fourier_image(params: Any, scale: Any, h: int, w: int) -> Any:
    """The image ``irfft2(scale * (re + i im)) / 4`` of Fourier parameters
    ``[..., h, w // 2 + 1, 2]`` (real and imaginary parts last): ``[..., h, w]``."""
    import jax.numpy as jnp

    spectrum = (params[..., 0] + 1j * params[..., 1]) * scale
    return jnp.fft.irfft2(spectrum, s=(h, w), axes=(-2, -1)) / 4.0


def to_rgb(raw: Any, matrix: Any) -> Any:
    """``sigmoid(matrix @ raw)`` over the channel axis of ``[n, c, h, w]``: values in (0, 1)."""
    import jax
    import jax.numpy as jnp

    return jax.nn.sigmoid(jnp.einsum("jk,nkhw->njhw", matrix, raw))


class Adam(NamedTuple):
    """State of :func:`adam_update`: step count and the moment estimates."""

    t: Any
    m: Any
    v: Any


def adam_init(params: Any) -> Adam:
    """Zero moments for ``params`` (one array)."""
    import jax.numpy as jnp

    return Adam(jnp.zeros((), jnp.int32), jnp.zeros_like(params), jnp.zeros_like(params))


def adam_update(params: Any, grads: Any, state: Adam, lr: float, b1: float = 0.9,
                b2: float = 0.999, eps: float = 1e-8) -> tuple[Any, Adam]:
    """One Adam step (Kingma and Ba, with bias correction) that *descends* ``grads``."""
    import jax.numpy as jnp

    t = state.t + 1
    m = b1 * state.m + (1 - b1) * grads
    v = b2 * state.v + (1 - b2) * grads * grads
    m_hat = m / (1 - b1 ** t.astype(jnp.float32))
    v_hat = v / (1 - b2 ** t.astype(jnp.float32))
    return params - lr * m_hat / (jnp.sqrt(v_hat) + eps), Adam(t, m, v)
