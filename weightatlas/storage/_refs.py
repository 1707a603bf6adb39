"""Naming snapshots: ``MODEL@STEP`` references, file names, and listing entries."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from weightatlas.errors import StoreError
from weightatlas.storage._format import check_name

__all__ = ["MAX_STEP", "SnapshotInfo", "file_name", "parse_file_name", "parse_ref", "ref"]

MAX_STEP = 2**63 - 1
_FILE = re.compile(r"^(step-(?P<step>0|[1-9][0-9]{0,18})"
                   r"|tag-(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.+\-]*))\.arrow$")


def ref(model: str, step: int | None, tag: str | None) -> str:
    """``model@step`` or ``model@tag``."""
    return f"{model}@{step if step is not None else tag}"


def parse_ref(text: str) -> tuple[str, int | None, str | None]:
    """Split ``MODEL[@STEP|@TAG]`` into ``(model, step, tag)``.

    ``@step:N`` and ``@tag:T`` force the reading; a bare ``@123`` is a step.

    Example:
        >>> parse_ref("mlp@100"), parse_ref("mlp@best"), parse_ref("mlp")
        (('mlp', 100, None), ('mlp', None, 'best'), ('mlp', None, None))
    """
    model, at, what = text.partition("@")
    check_name(model, "model name")
    if not at:
        return model, None, None
    if what.startswith("tag:"):
        return model, None, check_name(what[4:], "tag")
    if what.startswith("step:") or what.isdigit():
        digits = what.removeprefix("step:")
        if not digits.isdigit() or int(digits) > MAX_STEP:
            raise StoreError(f"{text!r}: step must be an integer from 0 to {MAX_STEP}")
        return model, int(digits), None
    return model, None, check_name(what, "tag")


def file_name(step: int | None, tag: str | None) -> str:
    """The file name of a snapshot: ``step-<N>.arrow`` or ``tag-<T>.arrow``."""
    if (step is None) == (tag is None):
        raise StoreError("a snapshot has either a step or a tag (exactly one)")
    if step is not None:
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
            raise StoreError(f"step must be an integer from 0 to {MAX_STEP}, got {step!r}")
        return f"step-{step}.arrow"
    return f"tag-{check_name(str(tag), 'tag')}.arrow"


def parse_file_name(name: str) -> tuple[int | None, str | None] | None:
    """``(step, tag)`` of a snapshot file name, or ``None`` for any other name."""
    m = _FILE.match(name)
    if not m:
        return None
    return (int(m["step"]) if m["step"] is not None else None), m["tag"]


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot as listed: identity and totals, read from the file's footer only.

    ``problem`` is set (and the figures are zero) when the file cannot be read; the
    listing goes on, and ``verify`` says more.
    """

    model: str
    step: int | None
    tag: str | None
    path: str
    created: str
    framework: str
    source_file: str
    source_sha256: str | None
    n_tensors: int
    n_params: int
    nbytes: int
    file_size: int
    problem: str | None = None

    @property
    def ref(self) -> str:
        """``model@step`` or ``model@tag``."""
        return ref(self.model, self.step, self.tag)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``--json`` output)."""
        return {"ref": self.ref, **self.__dict__}
