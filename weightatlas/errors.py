"""The one error root of weightatlas and its narrow subclasses.

Every failure that weightatlas reports to a user is a :class:`WeightAtlasError`.
Messages name the file, the tensor (or node), what was expected and what was
found, so that one line is enough to act on::

    model.safetensors: tensor 'fc.weight': data_offsets [0, 4096] hold 4096 bytes,
    shape [64, 32] float32 needs 8192

Lower-level exceptions (``OSError``, ``json.JSONDecodeError``, pyarrow errors) are
wrapped with context and chained (``raise ... from e``) as they pass up.
"""

from __future__ import annotations

__all__ = [
    "FormatError",
    "InputMismatchError",
    "IntegrityError",
    "NotFoundError",
    "PathEscapeError",
    "ResourceLimitError",
    "ShapeError",
    "SnapshotExistsError",
    "StoreError",
    "UnsafeInputError",
    "UnsupportedError",
    "UnsupportedOperatorError",
    "WeightAtlasError",
]


class WeightAtlasError(Exception):
    """Root of every error weightatlas raises on purpose."""


class FormatError(WeightAtlasError):
    """A file is not what it claims to be: bad header, bad JSON, bad offsets, truncated."""


class ShapeError(FormatError):
    """A shape is invalid, overflows, or disagrees with the number of bytes given."""


class UnsupportedError(WeightAtlasError):
    """A well-formed input that weightatlas does not handle (unknown format or dtype)."""


class UnsafeInputError(WeightAtlasError):
    """An input that would execute code or otherwise cannot be read safely."""


class PathEscapeError(UnsafeInputError):
    """A path inside an input points outside the folder it must stay in."""


class ResourceLimitError(WeightAtlasError):
    """An input exceeds a configured size limit (header size, tensor count, bytes)."""


class StoreError(WeightAtlasError):
    """The weight store cannot be opened, written or changed as asked."""


class NotFoundError(StoreError):
    """A path, model, snapshot or tensor does not exist."""


class SnapshotExistsError(StoreError):
    """A snapshot with the same model and step/tag already exists with other content."""


class IntegrityError(StoreError):
    """Stored bytes no longer match their checksum, or a stored file is damaged."""


class UnsupportedOperatorError(UnsupportedError):
    """A graph uses an operator, attribute or control flow that the executor cannot trace."""


class InputMismatchError(WeightAtlasError):
    """Inputs or weights given to an executor do not match the graph (name, shape or dtype)."""
