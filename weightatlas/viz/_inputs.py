"""What a chart builder accepts: a snapshot and a tensor name, or an array."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightatlas.errors import NotFoundError, ShapeError, UnsupportedError
from weightatlas.storage import Snapshot

__all__ = ["TensorInput", "resolve"]

_DEFAULT_LAYOUTS = {2: ("out", "in"), 4: ("out", "in", "h", "w")}


@dataclass(frozen=True)
class TensorInput:
    """One tensor to chart: its values and what the store says about it."""

    name: str
    array: np.ndarray
    layout: tuple[str, ...]
    kind: str
    dtype: str
    ref: str | None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.array.shape)

    @property
    def is_conv(self) -> bool:
        """A convolution kernel laid out ``[out, in, (h,) w]``."""
        if self.array.ndim not in (3, 4):
            return False
        if self.kind.startswith("conv"):
            return True
        return tuple(self.layout[:2]) == ("out", "in")

    @property
    def exact32(self) -> bool:
        """Values are exactly float32 (float32 or narrower floats)."""
        dt = self.array.dtype
        return (dt.kind == "f" and dt.itemsize <= 4) or dt.name == "bfloat16" \
            or dt.name.startswith("float8")

    def describe(self) -> str:
        """``float32 [64, 32] linear`` (for a header line)."""
        shape = "[" + ", ".join(map(str, self.shape)) + "]"
        where = f" in {self.ref}" if self.ref else ""
        return f"{self.dtype} {shape} {self.kind}{where}"


def resolve(snapshot: Snapshot | np.ndarray | Any, tensor: str | None,
            layout: Sequence[str] | None = None, view: str = "chart") -> TensorInput:
    """Turn ``(snapshot, tensor)`` or ``(array, label)`` into a :class:`TensorInput`.

    Raises:
        NotFoundError: A snapshot without a tensor name, or with an unknown one.
        UnsupportedError: An array of a dtype that has no numbers (object, string, complex).
        ShapeError: ``layout`` names a different number of axes than the array has.
    """
    if isinstance(snapshot, Snapshot):
        if tensor is None:
            some = ", ".join(snapshot.names[:5])
            raise NotFoundError(f"{view}: snapshot {snapshot.ref} holds {len(snapshot)} "
                                f"tensors; name one (e.g. {some})")
        info = snapshot.info(tensor)
        array = snapshot.read(tensor)
        lay = tuple(layout) if layout is not None else tuple(info.layout)
        kind, dtype, ref = info.kind, info.dtype, snapshot.ref
        name = tensor
    else:
        name = tensor if tensor is not None else "tensor"
        try:
            array = np.asarray(snapshot)
        except (TypeError, ValueError) as e:
            raise UnsupportedError(f"{view}: cannot read {type(snapshot).__name__} as an "
                                   f"array: {e}") from e
        if array.dtype.kind not in "fiub" and array.dtype.name != "bfloat16" \
                and not array.dtype.name.startswith("float8"):
            raise UnsupportedError(f"{view}: tensor {name!r} has dtype {array.dtype}; "
                                   "expected a floating, integer or boolean array")
        lay = tuple(layout) if layout is not None else _DEFAULT_LAYOUTS.get(
            array.ndim, tuple(f"d{i}" for i in range(array.ndim)))
        kind = "conv2d" if array.ndim == 4 and layout is None else "other"
        dtype, ref = array.dtype.name, None
    if len(lay) != array.ndim:
        raise ShapeError(f"{view}: tensor {name!r} has {array.ndim} axes, layout {list(lay)} "
                         f"names {len(lay)}")
    return TensorInput(name=name, array=array, layout=lay, kind=kind, dtype=dtype, ref=ref)
