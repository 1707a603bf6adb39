"""A pickle reader that runs no code: the opcode stream of a PyTorch checkpoint, interpreted.

``torch.save`` writes a pickle whose only callables are a handful of tensor
rebuilders (``torch._utils._rebuild_tensor_v2``...), ``collections.OrderedDict`` and
storage type names. This module interprets protocols 0-5 opcode by opcode and
**imports nothing**: every ``GLOBAL``/``STACK_GLOBAL`` is looked up in an allowlist of
names and turned into an inert marker; any other name stops the read with an
:class:`~weightatlas.errors.UnsafeInputError` naming it, before a single call could be
made. The result is plain Python containers holding :class:`TensorRef` and
:class:`StorageRef` values (storage key, dtype, offset, shape, stride); no tensor is
built and no storage byte is touched here.

TorchScript archives pickle their modules as instances of ``__torch__.*`` classes,
which are TorchScript definitions, not Python ones; with ``script_classes=True`` they
become inert :class:`ScriptObject` values holding their attribute dict.

Malformed streams (truncation, stack underflow, a dangling memo reference, SETITEM on
something that is not a dict...) raise :class:`~weightatlas.errors.FormatError`, never
``IndexError``, ``KeyError`` or ``struct.error`` (the fuzzing findings of pytorch#127525).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from weightatlas.errors import FormatError, UnsafeInputError, UnsupportedError

__all__ = ["Global", "ScriptObject", "StorageRef", "TensorRef", "load"]

#: Storage class names (``torch.FloatStorage``...) -> NumPy/ml_dtypes dtype names.
STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
#: ``torch.<dtype>`` globals (``_rebuild_tensor_v3`` with an untyped storage) -> dtype names.
TORCH_DTYPES = {
    "float64": "float64", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
    "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2", "int64": "int64",
    "int32": "int32", "int16": "int16", "int8": "int8", "uint64": "uint64", "uint32": "uint32",
    "uint16": "uint16", "uint8": "uint8", "bool": "bool",
}
_REBUILDERS = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
               "_rebuild_parameter", "_rebuild_parameter_with_state"}
_JIT_HELPERS = {"restore_type_tag", "build_intlist", "build_doublelist", "build_boollist",
                "build_tensorlist", "build_tensor_from_id"}
#: Known PyTorch callables for tensors weightatlas cannot hold: refused as unsupported.
_UNSUPPORTED = {
    ("torch._utils", "_rebuild_qtensor"): "quantized tensors",
    ("torch._utils", "_rebuild_sparse_tensor"): "sparse tensors",
    ("torch._utils", "_rebuild_sparse_csr_tensor"): "sparse tensors",
    ("torch._utils", "_rebuild_nested_tensor"): "nested tensors",
    ("torch._utils", "_rebuild_wrapper_subclass"): "tensor subclasses",
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): "meta tensors (no data)",
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): "device tensors saved from NumPy",
    ("torch._tensor", "_rebuild_from_type_v2"): "tensor subclasses",
}
_COMPLEX = {"ComplexFloatStorage", "ComplexDoubleStorage", "complex64", "complex128",
            "complex32", "QInt8Storage", "QUInt8Storage", "QInt32Storage", "QUInt4x2Storage"}

_MAX_DEPTH = 200


@dataclass(frozen=True)
class Global:
    """An allowlisted ``module.name`` seen in the stream; never imported or called."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class StorageRef:
    """A persistent storage reference: ``data/<key>`` in the archive."""

    key: str
    dtype: str | None  #: None for an untyped storage (the tensor names its dtype)
    numel: int  #: elements for a typed storage, bytes for an untyped one
    location: str


@dataclass(eq=False)
class TensorRef:
    """A tensor described by the pickle: a strided view of a storage."""

    storage: StorageRef
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    is_parameter: bool = False


@dataclass(eq=False)
class ScriptObject:
    """An instance of a TorchScript class (``__torch__.*``) with its attributes."""

    cls: Global
    state: Any = None


@dataclass
class _Mark:
    pass


@dataclass
class _Dict:
    """A dict under construction (``OrderedDict()`` or ``{}``), with BUILD state kept aside."""

    items: dict[Any, Any] = field(default_factory=dict)


_MARK = _Mark()


def _allowed(module: str, name: str, script_classes: bool) -> Global:
    if (module, name) in _UNSUPPORTED:
        raise UnsupportedError(f"{_UNSUPPORTED[module, name]} ({module}.{name}) are not supported")
    ok = (
        (module == "collections" and name == "OrderedDict")
        or (module == "torch._utils" and name in _REBUILDERS)
        or (module in ("torch", "torch.storage") and name in STORAGE_DTYPES)
        or (module in ("torch", "torch.storage") and name in ("UntypedStorage", "TypedStorage"))
        or (module == "torch" and name in TORCH_DTYPES)
        or (module == "torch.jit._pickle" and name in _JIT_HELPERS)
        or (script_classes and module.startswith("__torch__") and name.isidentifier())
    )
    if module in ("torch", "torch.storage") and name in _COMPLEX:
        raise UnsupportedError(f"{module}.{name}: complex and quantized tensors are not supported")
    if not ok:
        raise UnsafeInputError(
            f"refuses to load global {module}.{name}: only tensors, plain containers and "
            "numbers are read from a checkpoint, and no pickled code is ever run (save the "
            "model's state_dict() instead of objects)"
        )
    return Global(module, name)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise FormatError(f"{what}: expected a tuple of integers, found {value!r:.80}")
    return tuple(value)


class _Machine:
    """The pickle virtual machine, restricted to data."""

    def __init__(self, data: bytes, label: str, script_classes: bool) -> None:
        self.data = memoryview(data)
        self.label = label
        self.script_classes = script_classes
        self.pos = 0
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.storages: dict[str, StorageRef] = {}

    # ---- reading the stream ------------------------------------------------------------
    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise FormatError(f"pickle ends early: needs {n} bytes at offset {self.pos}, "
                              f"{len(self.data) - self.pos} left (file truncated?)")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def line(self) -> str:
        end = bytes(self.data[self.pos : self.pos + 65536]).find(b"\n")
        if end < 0:
            raise FormatError(f"pickle ends early: no newline after offset {self.pos}")
        raw = self.take(end + 1)[:-1]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"text argument at offset {self.pos} is not UTF-8") from e

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise FormatError(f"string at offset {self.pos} is not UTF-8") from e

    # ---- stack helpers -----------------------------------------------------------------
    def pop(self) -> Any:
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) <= floor:
            raise FormatError(f"stack underflow at offset {self.pos}")
        return self.stack.pop()

    def top(self) -> Any:
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) <= floor:
            raise FormatError(f"stack underflow at offset {self.pos}")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise FormatError(f"no MARK before offset {self.pos}")
        at = self.marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def get(self, key: int) -> Any:
        if key not in self.memo:
            raise FormatError(f"memo entry {key} read at offset {self.pos} was never stored")
        return self.memo[key]

    def put(self, key: int) -> None:
        if key < 0:
            raise FormatError(f"negative memo index {key} at offset {self.pos}")
        self.memo[key] = self.top()

    # ---- the callables -----------------------------------------------------------------
    def persistent(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise FormatError(f"persistent id {pid!r:.80} is not a ('storage', ...) record")
        _, kind, key, location, numel = pid
        if not isinstance(kind, Global) or not isinstance(key, str) or not key:
            raise FormatError(f"storage record {pid!r:.80}: expected a storage type and a key")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise FormatError(f"storage {key!r}: size {numel!r} is not a non-negative integer")
        dtype = STORAGE_DTYPES.get(kind.name)
        if dtype is None and kind.name not in ("UntypedStorage", "TypedStorage"):
            raise FormatError(f"storage {key!r}: {kind.qualname} is not a storage type")
        ref = self.storages.get(key)
        if ref is None:
            ref = StorageRef(key, dtype, numel, str(location))
            self.storages[key] = ref
        elif (ref.dtype, ref.numel) != (dtype, numel):
            raise FormatError(f"storage {key!r} is described twice with different types or sizes")
        return ref

    def call(self, func: Any, args: Any) -> Any:
        if not isinstance(func, Global):
            raise FormatError(f"REDUCE at offset {self.pos} calls a {type(func).__name__}, "
                              "not an allowlisted function")
        if not isinstance(args, tuple):
            raise FormatError(f"REDUCE at offset {self.pos}: arguments are not a tuple")
        name = func.name
        if func.module == "collections":
            if args not in ((), ([],)):
                raise FormatError("OrderedDict called with arguments")
            return _Dict()
        if func.module == "torch.jit._pickle":
            if not args:
                raise FormatError(f"{func.qualname} called without arguments")
            if name == "build_tensor_from_id":
                raise UnsupportedError("TorchScript tensor tables are not supported")
            return args[0]
        if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            if not args or not isinstance(args[0], TensorRef):
                raise FormatError(f"{name}: first argument is not a tensor")
            args[0].is_parameter = True
            return args[0]
        if name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return self.tensor(name, args)
        raise FormatError(f"{func.qualname} cannot be called")

    def tensor(self, name: str, args: tuple[Any, ...]) -> TensorRef:
        if len(args) < 4 or not isinstance(args[0], StorageRef):
            raise FormatError(f"{name}: expected (storage, offset, size, stride, ...), found "
                              f"{len(args)} arguments")
        storage, offset = args[0], args[1]
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise FormatError(f"{name}: storage offset {offset!r} is not a non-negative integer")
        shape = _ints(args[2], f"{name}: size")
        stride = _ints(args[3], f"{name}: stride")
        if len(shape) != len(stride):
            raise FormatError(f"{name}: size {list(shape)} and stride {list(stride)} differ in "
                              "length")
        if name == "_rebuild_tensor_v3":
            if len(args) < 7 or not isinstance(args[6], Global) or args[6].name not in TORCH_DTYPES:
                raise FormatError(f"{name}: expected a torch dtype as 7th argument")
            dtype = TORCH_DTYPES[args[6].name]
        elif storage.dtype is None:
            raise FormatError(f"{name}: an untyped storage needs _rebuild_tensor_v3 and a dtype")
        else:
            dtype = storage.dtype
        return TensorRef(storage, dtype, offset, shape, stride)

    def build(self, obj: Any, state: Any) -> None:
        if isinstance(obj, _Dict):
            return  # OrderedDict state: the state_dict's _metadata (versions); not tensors
        if isinstance(obj, ScriptObject):
            obj.state = state
            return
        if isinstance(obj, TensorRef):
            return  # tensor attributes (a Parameter's __dict__): nothing we keep
        raise FormatError(f"BUILD at offset {self.pos} on a {type(obj).__name__}")

    def new_object(self, cls: Any, args: Any) -> ScriptObject:
        if not isinstance(cls, Global) or not cls.module.startswith("__torch__"):
            name = cls.qualname if isinstance(cls, Global) else type(cls).__name__
            raise UnsafeInputError(f"refuses to create an object of {name}: only TorchScript "
                                   "modules are read this way")
        if args != ():
            raise FormatError(f"TorchScript object {cls.qualname} created with arguments")
        return ScriptObject(cls)

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> Any:
        from weightatlas.adapters._torch_pickle_ops import OPS as ops
        while True:
            at = self.pos
            code = self.take(1)
            handler = ops.get(code)
            if handler is None:
                raise FormatError(f"unknown or unsupported pickle opcode {code!r} at offset {at}")
            if handler(self) is STOP:
                if self.stack[:-1] or self.marks:
                    raise FormatError(f"STOP at offset {at} with {len(self.stack)} values on "
                                      "the stack")
                return self.stack[-1] if self.stack else None


STOP = object()  #: what an opcode handler returns to end the stream


def _finish(value: Any, done: dict[int, Any], busy: set[int], depth: int = 0) -> Any:
    """Turn ``_Dict`` placeholders into dicts, recursively.

    Shared containers are converted once (``done``), so a pickle that references one list
    from many places cannot make this exponential; a container that contains itself is
    refused (``busy``).
    """
    if not isinstance(value, _Dict | dict | list | tuple | ScriptObject):
        return value
    key = id(value)
    if key in done:
        return done[key]
    if key in busy:
        raise FormatError("a container contains itself (a reference cycle)")
    if depth > _MAX_DEPTH:
        raise FormatError(f"containers nested more than {_MAX_DEPTH} deep")
    busy.add(key)
    out: Any
    if isinstance(value, _Dict | dict):
        src = value.items if isinstance(value, _Dict) else value
        out = {k: _finish(v, done, busy, depth + 1) for k, v in src.items()}
    elif isinstance(value, list):
        out = [_finish(v, done, busy, depth + 1) for v in value]
    elif isinstance(value, tuple):
        out = tuple(_finish(v, done, busy, depth + 1) for v in value)
    else:
        value.state = _finish(value.state, done, busy, depth + 1)
        out = value
    busy.discard(key)
    done[key] = out
    return out


def load(data: bytes, label: str, *, script_classes: bool = False) -> tuple[Any, list[StorageRef]]:
    """Interpret a checkpoint's pickle without importing or calling anything.

    Args:
        data: The bytes of ``data.pkl``.
        label: Where they come from, for messages (``model.pt:archive/data.pkl``).
        script_classes: Accept ``__torch__.*`` classes (TorchScript archives) as inert
            :class:`ScriptObject` values.

    Returns:
        The unpickled value (dicts, lists, tuples, numbers, strings, :class:`TensorRef`,
        :class:`ScriptObject`) and every storage it references, in first-use order.

    Raises:
        UnsafeInputError: A global outside the allowlist, or an opcode that imports.
        UnsupportedError: Quantized, sparse, complex... tensors.
        FormatError: A malformed stream.

    Example:
        >>> import pickle
        >>> load(pickle.dumps({"epoch": 3, "lr": [0.1]}, protocol=2), "x.pkl")[0]
        {'epoch': 3, 'lr': [0.1]}
        >>> load(pickle.dumps(print), "x.pkl")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        weightatlas.errors.UnsafeInputError: x.pkl: refuses to load global builtins.print: ...
    """
    machine = _Machine(data, label, script_classes)
    try:
        value = _finish(machine.run(), {}, set())
    except (FormatError, UnsafeInputError, UnsupportedError) as e:
        raise type(e)(f"{label}: {e}") from e
    except (IndexError, KeyError, struct.error, ValueError, TypeError, RecursionError,
            OverflowError, MemoryError) as e:
        raise FormatError(f"{label}: malformed pickle near offset {machine.pos}: "
                          f"{type(e).__name__}: {e}") from e
    return value, list(machine.storages.values())
