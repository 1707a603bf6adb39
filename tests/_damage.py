"""Damaging snapshot files on purpose, for the integrity tests."""

from __future__ import annotations


def flip_byte(path: str, pos: int) -> None:
    """Flip one bit of the byte at ``pos`` of the file at ``path``, in place."""
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x40]))
