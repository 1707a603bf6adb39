"""The shape of the package: layers, lazy frameworks, curated public API, dependency floors."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import types
from importlib.metadata import version
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "weightatlas"
LAYERS = ("adapters", "core", "storage", "viz")
FRAMEWORKS = ("torch", "jax", "jaxlib", "flax", "onnx", "onnxruntime", "tensorflow")

# layer -> weightatlas subpackages it must never import
FORBIDDEN = {
    "storage": ("weightatlas.adapters", "weightatlas.core", "weightatlas.viz", "weightatlas.cli",
                "weightatlas._api"),
    "adapters": ("weightatlas.core", "weightatlas.viz", "weightatlas.cli", "weightatlas._api"),
    "core": ("weightatlas.adapters", "weightatlas.viz", "weightatlas.cli", "weightatlas._api"),
    "viz": ("weightatlas.adapters", "weightatlas.cli", "weightatlas._api", *FRAMEWORKS),
}


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, at_module_level) for every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno, id(node) in top))
    return found


def test_the_package_has_exactly_four_layers():
    subpackages = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())
    assert subpackages == list(LAYERS)
    assert (PKG / "cli.py").exists() and (PKG / "py.typed").exists()


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_respect_the_direction(layer: str):
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for module, line, _ in imports_of(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {module}")
    assert bad == []


def test_frameworks_are_never_imported_at_module_level():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        for module, line, top in imports_of(path):
            if top and module.split(".")[0] in FRAMEWORKS:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {module}")
    assert bad == []


def test_import_weightatlas_imports_no_framework():
    code = ("import sys, weightatlas, weightatlas.storage, weightatlas.adapters, "
            "weightatlas.core, weightatlas.viz, weightatlas.cli; "
            f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PKG.parent)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["weightatlas", *(f"weightatlas.{x}" for x in LAYERS),
                                  "weightatlas.errors"])
def test_public_api_is_curated(name: str):
    module = importlib.import_module(name)
    exported = set(module.__all__)
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == []
    public = {
        n for n, v in vars(module).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)
        and getattr(v, "__module__", name).startswith(name)  # defined in this package
        and n not in ("annotations",)
    }
    assert sorted(public - exported) == [], "public-looking names missing from __all__"


def test_dependency_floors():
    from packaging.version import Version

    assert Version(version("pyarrow")) >= Version("16")  # CVE-2023-47248 fixed in 14.0.1
    assert Version(version("onnx")) >= Version("1.21.0")  # external-data path CVEs
    assert Version(version("torch").split("+")[0]) >= Version("2.10")  # CVE-2026-24747
