"""Pytest plugin: names the docstring examples in weightatlas/ may use.

Loaded with ``-p tests._doctest_plugin`` (pyproject.toml), so that examples run as
doctests (``--doctest-modules weightatlas``) with a fresh folder ``tmp``, a store
``store`` and ``np``/``wa`` imported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_names(request: pytest.FixtureRequest) -> None:
    if not isinstance(request.node, pytest.DoctestItem):
        return
    import weightatlas as wa

    doctest_namespace = request.getfixturevalue("doctest_namespace")
    tmp_path: Path = request.getfixturevalue("tmp_path")
    doctest_namespace.update(np=np, wa=wa, tmp=tmp_path,
                             store=wa.open_store(tmp_path / "doc_store"))
