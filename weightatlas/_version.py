"""The package version (one place, read by pyproject.toml and written into every snapshot)."""

__version__ = "0.1.0"
