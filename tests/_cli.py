"""Running the ``weightatlas`` command in-process for tests."""

from __future__ import annotations

from typing import Any


def run_cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    """``weightatlas ARGS...`` in this process: (exit status, stdout, stderr)."""
    from weightatlas.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err
