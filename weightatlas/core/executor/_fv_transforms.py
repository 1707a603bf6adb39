"""Random transformations of feature visualization (transformation robustness).

Lucid's ``standard_transforms`` pad the image with gray, jitter it (random crop), scale
it, rotate it and jitter it again, so that the optimized image excites the unit wherever
it lands and at several sizes. The executor runs graphs with fixed input sizes, so here
the chain is one affine resampling that keeps the size: translate by an integer
``t1`` in ``[-jitter, jitter]``, scale and rotate about the centre, translate by
``t2`` in ``[-jitter // 2, jitter // 2]``; pixels from outside the image are gray
(0.5, Lucid's padding value), and sampling is bilinear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Transforms"]


@dataclass(frozen=True)
class Transforms:
    """The random transformations applied at every step.

    Attributes:
        jitter: Largest translation in pixels (``t1``; ``t2`` is half of it).
        scales: Scale factors drawn uniformly.
        rotate: Angles in degrees drawn uniformly.
    """

    jitter: int
    scales: tuple[float, ...]
    rotate: tuple[float, ...]

    @classmethod
    def of(cls, jitter: int, scales: Sequence[float], rotate: Sequence[float]) -> Transforms:
        return cls(int(jitter), tuple(float(s) for s in scales) or (1.0,),
                   tuple(float(r) for r in rotate) or (0.0,))

    @property
    def identity(self) -> bool:
        """No transformation at all (the image goes to the model as is)."""
        return self.jitter == 0 and set(self.scales) == {1.0} and set(self.rotate) == {0.0}

    def sample(self, key: Any) -> Any:
        """``[t1y, t1x, scale, angle (radians), t2y, t2x]`` for one image."""
        import jax
        import jax.numpy as jnp

        k1, k2, k3, k4 = jax.random.split(key, 4)
        j, j2 = self.jitter, self.jitter // 2
        t1 = jax.random.randint(k1, (2,), -j, j + 1).astype(jnp.float32)
        t2 = jax.random.randint(k4, (2,), -j2, j2 + 1).astype(jnp.float32)
        s = jax.random.choice(k2, jnp.asarray(self.scales, jnp.float32))
        a = jax.random.choice(k3, jnp.asarray(self.rotate, jnp.float32)) * (math.pi / 180)
        return jnp.concatenate([t1, s[None], a[None], t2])

    def apply(self, image: Any, p: Any) -> Any:
        """One ``[c, h, w]`` image moved by the parameters ``p`` of :meth:`sample`."""
        import jax
        import jax.numpy as jnp
        from jax.scipy.ndimage import map_coordinates

        _, h, w = image.shape
        cy, cx = (h - 1) / 2, (w - 1) / 2
        yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                              jnp.arange(w, dtype=jnp.float32), indexing="ij")
        # output pixel -> source pixel: undo t2, then the rotation and scale, then t1
        dy, dx = yy - p[4] - cy, xx - p[5] - cx
        cos, sin, s = jnp.cos(p[3]), jnp.sin(p[3]), p[2]
        sy = (cos * dy - sin * dx) / s + cy - p[0]
        sx = (sin * dy + cos * dx) / s + cx - p[1]

        def one(channel: Any) -> Any:
            return map_coordinates(channel, [sy, sx], order=1, mode="constant", cval=0.5)

        return jax.vmap(one)(image)
