"""Errors of the executor (defined in :mod:`weightatlas.errors`, the one error root)."""

from __future__ import annotations

from weightatlas.errors import InputMismatchError, UnsupportedOperatorError

__all__ = ["InputMismatchError", "UnsupportedOperatorError"]
