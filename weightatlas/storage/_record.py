"""The tensor record: what an adapter hands to the store for one tensor.

A :class:`TensorRecord` carries one tensor in its *canonical* layout (linear
``[out, in]``, convolution ``[out, in, *spatial]``, embedding ``[vocab, dim]``)
together with what is needed to give back the layout the source file used:
``source_layout`` names the source's axes and ``source_shape`` its shape, so
``to_source`` is a transpose by axis name followed by a reshape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightatlas.errors import ShapeError, UnsupportedError
from weightatlas.storage._dtypes import dtype_name

__all__ = ["KINDS", "TensorRecord", "flipped_axes", "split_name", "to_canonical_layout",
           "to_source_layout"]

#: The kinds of tensor a snapshot distinguishes.
KINDS = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose",
    "embedding",
    "norm",
    "recurrent",
    "attention",
    "other",
)

#: The most dimensions a stored tensor may have.
MAX_NDIM = 64


def split_name(name: str) -> tuple[str, str]:
    """Split a canonical tensor path into ``(module, param)``.

    Example:
        >>> split_name("layer1.0.conv2.weight")
        ('layer1.0.conv2', 'weight')
        >>> split_name("scale")
        ('', 'scale')
    """
    module, _, param = name.rpartition(".")
    return module, param


@dataclass(frozen=True)
class TensorRecord:
    """One tensor on its way into a snapshot.

    Args:
        name: Canonical dotted path, e.g. ``layer1.0.conv2.weight``. Unique in a snapshot.
        data: The values in canonical layout. Any strides; a view over a memory map is
            read one chunk at a time, so it is never copied whole.
        source_name: The name in the source file (defaults to ``name``).
        kind: One of :data:`KINDS`.
        layout: Canonical axis names, one per dimension (``("out", "in", "h", "w")``).
        source_layout: Axis names in the source's order (defaults to ``layout``).
        source_shape: The shape in the source (defaults to the canonical shape with its
            axes reordered as ``source_layout``).
        module: Module path (defaults to ``name`` without its last component).
        param: Parameter name (defaults to the last component of ``name``).
        attrs: Extra facts as JSON-serialisable values (groups, gate, transposed...).

    Example:
        >>> r = TensorRecord("fc.weight", np.zeros((4, 3), np.float32), kind="linear",
        ...                  layout=("out", "in"), source_layout=("in", "out"))
        >>> r.source_shape
        (3, 4)
    """

    name: str
    data: np.ndarray
    source_name: str = ""
    kind: str = "other"
    layout: tuple[str, ...] = ()
    source_layout: tuple[str, ...] = ()
    source_shape: tuple[int, ...] = ()
    module: str = ""
    param: str = ""
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.name, str) or not self.name:
            raise ShapeError(f"tensor name must be a non-empty string, got {self.name!r}")
        if "\x00" in self.name:
            raise ShapeError(f"tensor {self.name!r}: name contains a NUL character")
        if not isinstance(self.data, np.ndarray):
            raise UnsupportedError(
                f"tensor {self.name!r}: data must be a numpy array, got {type(self.data).__name__}"
            )
        dtype_name(self.data.dtype)  # raises UnsupportedError for types we cannot store
        ndim = self.data.ndim
        if ndim > MAX_NDIM:
            raise ShapeError(f"tensor {self.name!r}: {ndim} dimensions, at most {MAX_NDIM}")
        if self.kind not in KINDS:
            raise UnsupportedError(
                f"tensor {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}"
            )
        layout = tuple(self.layout) or tuple(f"d{i}" for i in range(ndim))
        if len(layout) != ndim:
            raise ShapeError(
                f"tensor {self.name!r}: layout {list(layout)} names {len(layout)} axes, "
                f"data has {ndim}"
            )
        set_(self, "layout", layout)
        source_layout = tuple(self.source_layout) or layout
        set_(self, "source_layout", source_layout)
        if not self.source_shape:
            if sorted(source_layout) == sorted(layout):
                shape = dict(zip(layout, self.data.shape, strict=True))
                source_shape = tuple(shape[a] for a in source_layout)
            else:
                raise ShapeError(
                    f"tensor {self.name!r}: source layout {list(source_layout)} has other axes "
                    f"than {list(layout)}; give source_shape too"
                )
            set_(self, "source_shape", source_shape)
        else:
            set_(self, "source_shape", tuple(int(d) for d in self.source_shape))
        if int(np.prod(self.source_shape, dtype=object)) != self.data.size:
            raise ShapeError(
                f"tensor {self.name!r}: source shape {list(self.source_shape)} holds "
                f"{int(np.prod(self.source_shape, dtype=object))} values, data has {self.data.size}"
            )
        module, param = split_name(self.name)
        set_(self, "source_name", self.source_name or self.name)
        set_(self, "module", self.module or module)
        set_(self, "param", self.param or param)
        try:
            json.dumps(dict(self.attrs))
        except (TypeError, ValueError) as e:
            raise UnsupportedError(f"tensor {self.name!r}: attrs are not JSON: {e}") from e

    @property
    def dtype(self) -> str:
        """Canonical dtype name of the data."""
        return dtype_name(self.data.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        """Canonical shape."""
        return tuple(int(d) for d in self.data.shape)


def to_source_layout(
    array: np.ndarray,
    layout: tuple[str, ...] | list[str],
    source_layout: tuple[str, ...] | list[str],
    source_shape: tuple[int, ...] | list[int],
    flip: tuple[str, ...] | list[str] = (),
) -> np.ndarray:
    """Give back a canonical array in the source's layout (a view where possible).

    The canonical axes named in ``flip`` are reversed first (a record's ``attrs["flip"]``:
    axes the adapter reversed, as for a Flax ``ConvTranspose`` kernel, which PyTorch's
    convention stores spatially flipped), then the axes are permuted into the source's
    axis order by name, and the result is reshaped to ``source_shape`` (for sources that
    fuse or split axes).

    Example:
        >>> w = np.arange(6).reshape(2, 3)          # [out, in]
        >>> to_source_layout(w, ("out", "in"), ("in", "out"), (3, 2)).shape
        (3, 2)
    """
    layout = list(layout)
    source_layout = list(source_layout)
    if flip:
        array = array[tuple(slice(None, None, -1) if a in flip else slice(None)
                            for a in layout)]
    if layout != source_layout and sorted(layout) == sorted(source_layout):
        array = array.transpose([layout.index(a) for a in source_layout])
    if tuple(array.shape) != tuple(source_shape):
        array = array.reshape(tuple(source_shape))
    return array


def to_canonical_layout(
    array: np.ndarray,
    layout: tuple[str, ...] | list[str],
    source_layout: tuple[str, ...] | list[str],
    shape: tuple[int, ...] | list[int],
    flip: tuple[str, ...] | list[str] = (),
) -> np.ndarray:
    """The inverse of :func:`to_source_layout`: a source-layout array (a weight's gradient
    as the source's graph computes it) back in the canonical ``layout`` and ``shape``.

    Example:
        >>> g = np.arange(6).reshape(3, 2)          # [in, out], as a MatMul holds it
        >>> to_canonical_layout(g, ("out", "in"), ("in", "out"), (2, 3)).tolist()
        [[0, 2, 4], [1, 3, 5]]
    """
    layout, source_layout, shape = list(layout), list(source_layout), tuple(shape)
    if layout != source_layout and sorted(layout) == sorted(source_layout):
        permuted = tuple(shape[layout.index(a)] for a in source_layout)
        array = array.reshape(permuted).transpose([source_layout.index(a) for a in layout])
    else:
        array = array.reshape(shape)
    if flip:
        array = array[tuple(slice(None, None, -1) if a in flip else slice(None)
                            for a in layout)]
    return np.ascontiguousarray(array)


def flipped_axes(attrs: str | Mapping[str, Any] | None) -> list[str]:
    """The axes a record's ``attrs`` (JSON text or a mapping) say the adapter reversed.

    Example:
        >>> flipped_axes('{"flip": ["h", "w"], "groups": 1}'), flipped_axes("{}")
        (['h', 'w'], [])
    """
    if not attrs:
        return []
    if isinstance(attrs, str):
        if '"flip"' not in attrs:  # most records: no JSON parse on the read path
            return []
        attrs = json.loads(attrs)
    flip = attrs.get("flip") if isinstance(attrs, Mapping) else None
    return [str(a) for a in flip] if isinstance(flip, list) else []
