"""The opcodes of the restricted pickle reader (see :mod:`._torch_pickle`).

One handler per opcode of protocols 0-5. Data opcodes build plain values; ``GLOBAL`` and
``STACK_GLOBAL`` go through the allowlist; ``REDUCE``, ``BUILD`` and ``NEWOBJ`` only
reach the reader's own inert callables; the opcodes that import or call by other
routes (``INST``, ``OBJ``, ``NEWOBJ_EX``, ``EXT1/2/4``) are refused as unsafe, and
out-of-band buffers as unsupported.
"""

from __future__ import annotations

from typing import Any

from weightatlas.adapters._torch_pickle import STOP, _allowed, _Dict, _Machine
from weightatlas.errors import FormatError, UnsafeInputError

__all__ = ["OPS"]


def _op_setitems(m: _Machine, items: list[Any]) -> None:
    target = m.top()
    if isinstance(target, _Dict):
        target = target.items
    if not isinstance(target, dict):
        raise FormatError(f"SETITEM at offset {m.pos} on a {type(target).__name__}, not a dict")
    if len(items) % 2:
        raise FormatError(f"SETITEMS at offset {m.pos} with an odd number of values")
    for k, v in zip(items[::2], items[1::2], strict=True):
        try:
            target[k] = v
        except TypeError as e:
            raise FormatError(f"dict key at offset {m.pos} is not hashable: {e}") from e


def _op_appends(m: _Machine, items: list[Any]) -> None:
    target = m.top()
    if not isinstance(target, list):
        raise FormatError(f"APPEND at offset {m.pos} on a {type(target).__name__}, not a list")
    target.extend(items)


def _op_global(m: _Machine) -> None:
    module, name = m.line(), m.line()
    m.stack.append(_allowed(module, name, m.script_classes))


def _op_stack_global(m: _Machine) -> None:
    name, module = m.pop(), m.pop()
    if not isinstance(module, str) or not isinstance(name, str):
        raise FormatError(f"STACK_GLOBAL at offset {m.pos} needs two strings")
    m.stack.append(_allowed(module, name, m.script_classes))


def _op_reduce(m: _Machine) -> None:
    args = m.pop()
    func = m.pop()
    m.stack.append(m.call(func, args))


def _op_build(m: _Machine) -> None:
    state = m.pop()
    m.build(m.top(), state)


def _op_newobj(m: _Machine) -> None:
    args = m.pop()
    cls = m.pop()
    m.stack.append(m.new_object(cls, args))


def _op_tuple_n(n: int) -> Any:
    def op(m: _Machine) -> None:
        items = [m.pop() for _ in range(n)][::-1]
        m.stack.append(tuple(items))
    return op


def _op_dict(m: _Machine) -> None:
    items = m.pop_mark()
    m.stack.append(_Dict())
    _op_setitems(m, items)


def _unsafe(what: str) -> Any:
    def op(m: _Machine) -> None:
        raise UnsafeInputError(f"pickle opcode {what} at offset {m.pos - 1} is not allowed "
                               "(it can import or call arbitrary code)")
    return op


def _bad(what: str) -> Any:
    def op(m: _Machine) -> None:
        raise FormatError(f"pickle opcode {what} at offset {m.pos - 1} is not supported")
    return op


def _long(raw: bytes) -> int:
    return int.from_bytes(raw, "little", signed=True)


def _int_line(m: _Machine) -> Any:
    text = m.line()
    if text in ("00", "01"):
        return text == "01"
    try:
        return int(text.rstrip("L"))
    except ValueError as e:
        raise FormatError(f"INT/LONG argument {text!r:.40} is not an integer") from e


def _float_line(m: _Machine) -> float:
    text = m.line()
    try:
        return float(text)
    except ValueError as e:
        raise FormatError(f"FLOAT argument {text!r:.40} is not a number") from e


def _string_line(m: _Machine) -> str:
    text = m.line()
    if len(text) < 2 or text[0] != text[-1] or text[0] not in "'\"":
        raise FormatError(f"STRING argument {text!r:.40} is not quoted")
    return text[1:-1]


def _frozen(items: list[Any]) -> frozenset[Any]:
    try:
        return frozenset(items)
    except TypeError as e:
        raise FormatError(f"unhashable set member: {e}") from e


def _additems(m: _Machine, items: list[Any]) -> None:
    target = m.top()
    if not isinstance(target, set):
        raise FormatError(f"ADDITEMS at offset {m.pos} on a {type(target).__name__}")
    try:
        target.update(items)
    except TypeError as e:
        raise FormatError(f"unhashable set member: {e}") from e


#: Opcode -> handler; an opcode missing here is refused as unknown.
OPS: dict[bytes, Any] = {
    b"\x80": lambda m: m.take(1),  # PROTO
    b"\x95": lambda m: m.take(8),  # FRAME (framing is a hint; we read the whole stream)
    b".": lambda m: STOP,
    b"(": lambda m: m.marks.append(len(m.stack)),
    b"0": lambda m: m.pop(),
    b"1": lambda m: m.pop_mark(),
    b"2": lambda m: m.stack.append(m.top()),
    b"N": lambda m: m.stack.append(None),
    b"\x88": lambda m: m.stack.append(True),
    b"\x89": lambda m: m.stack.append(False),
    b"I": lambda m: m.stack.append(_int_line(m)),
    b"L": lambda m: m.stack.append(_int_line(m)),
    b"J": lambda m: m.stack.append(m.unpack("<i")),
    b"K": lambda m: m.stack.append(m.unpack("<B")),
    b"M": lambda m: m.stack.append(m.unpack("<H")),
    b"\x8a": lambda m: m.stack.append(_long(m.take(m.unpack("<B")))),
    b"\x8b": lambda m: m.stack.append(_long(m.take(m.unpack("<i")))),
    b"F": lambda m: m.stack.append(_float_line(m)),
    b"G": lambda m: m.stack.append(m.unpack(">d")),
    b"S": lambda m: m.stack.append(_string_line(m)),
    b"T": lambda m: m.stack.append(m.take(m.unpack("<i"))),
    b"U": lambda m: m.stack.append(m.take(m.unpack("<B"))),
    b"V": lambda m: m.stack.append(m.line()),
    b"X": lambda m: m.stack.append(m.text(m.unpack("<I"))),
    b"\x8c": lambda m: m.stack.append(m.text(m.unpack("<B"))),
    b"\x8d": lambda m: m.stack.append(m.text(m.unpack("<Q"))),
    b"B": lambda m: m.stack.append(m.take(m.unpack("<I"))),
    b"C": lambda m: m.stack.append(m.take(m.unpack("<B"))),
    b"\x8e": lambda m: m.stack.append(m.take(m.unpack("<Q"))),
    b"\x96": lambda m: m.stack.append(bytearray(m.take(m.unpack("<Q")))),
    b")": lambda m: m.stack.append(()),
    b"t": lambda m: m.stack.append(tuple(m.pop_mark())),
    b"\x85": _op_tuple_n(1),
    b"\x86": _op_tuple_n(2),
    b"\x87": _op_tuple_n(3),
    b"]": lambda m: m.stack.append([]),
    b"l": lambda m: m.stack.append(list(m.pop_mark())),
    b"a": lambda m: _op_appends(m, [m.pop()]),
    b"e": lambda m: _op_appends(m, m.pop_mark()),
    b"}": lambda m: m.stack.append(_Dict()),
    b"d": _op_dict,
    b"s": lambda m: _op_setitems(m, [*reversed([m.pop(), m.pop()])]),
    b"u": lambda m: _op_setitems(m, m.pop_mark()),
    b"\x8f": lambda m: m.stack.append(set()),
    b"\x90": lambda m: _additems(m, m.pop_mark()),
    b"\x91": lambda m: m.stack.append(_frozen(m.pop_mark())),
    b"g": lambda m: m.stack.append(m.get(int(_int_line(m)))),
    b"h": lambda m: m.stack.append(m.get(m.unpack("<B"))),
    b"j": lambda m: m.stack.append(m.get(m.unpack("<I"))),
    b"p": lambda m: m.put(int(_int_line(m))),
    b"q": lambda m: m.put(m.unpack("<B")),
    b"r": lambda m: m.put(m.unpack("<I")),
    b"\x94": lambda m: m.put(len(m.memo)),
    b"c": _op_global,
    b"\x93": _op_stack_global,
    b"R": _op_reduce,
    b"b": _op_build,
    b"\x81": _op_newobj,
    b"Q": lambda m: m.stack.append(m.persistent(m.pop())),
    b"P": _bad("PERSID (text persistent id)"),
    b"i": _unsafe("INST"),
    b"o": _unsafe("OBJ"),
    b"\x92": _unsafe("NEWOBJ_EX"),
    b"\x82": _unsafe("EXT1"),
    b"\x83": _unsafe("EXT2"),
    b"\x84": _unsafe("EXT4"),
    b"\x97": _bad("NEXT_BUFFER (out-of-band buffer)"),
    b"\x98": _bad("READONLY_BUFFER"),
}
