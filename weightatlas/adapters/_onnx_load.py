"""Opening an ONNX file: the path, the size limit, and a guarded protobuf parse.

The file is memory-mapped and parsed by protobuf's upb decoder (memory-safe, depth
limited to 100 messages), after its size is checked against protobuf's own 2 GiB
limit, so parsing cannot exhaust memory on a file that could not be valid anyway; a
decode error is a ``FormatError`` naming the file, a nesting error a
``ResourceLimitError``. :func:`facts` gathers what the snapshot metadata records.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from weightatlas.adapters._onnx_external import ExternalFiles, ident, open_regular
from weightatlas.adapters._onnx_plan import Item
from weightatlas.errors import FormatError, NotFoundError, ResourceLimitError, WeightAtlasError

__all__ = ["facts", "parse", "resolve"]


def resolve(path: Path) -> Path:
    if not path.is_dir():
        return path
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    found = sorted(n for n in os.listdir(path) if n.lower().endswith(".onnx"))
    if len(found) == 1:
        return path / found[0]
    if found:
        raise NotFoundError(f"{path}: expected one .onnx file, found {len(found)} "
                            f"({', '.join(found[:5])}); pass one of them")
    raise NotFoundError(f"{path}: no .onnx file in this folder")


def parse(path: str, label: str, max_bytes: int) -> tuple[Any, tuple[int, int, int, int]]:
    import mmap

    import onnx
    from google.protobuf.message import DecodeError

    fd, st = open_regular(path, label, nofollow=False)
    try:
        if st.st_size > max_bytes:
            raise ResourceLimitError(
                f"{label}: {st.st_size} bytes; an ONNX protobuf file cannot exceed "
                f"{max_bytes} bytes (2 GiB). Save large models with external data "
                "(onnx.save_model(model, path, save_as_external_data=True))")
        model = onnx.ModelProto()
        if st.st_size:
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise WeightAtlasError(f"{label}: cannot memory-map: {e}") from e
            view = memoryview(mm)
            try:
                model.ParseFromString(view)
            except DecodeError as e:
                if "MaxDepth" in str(e):
                    raise ResourceLimitError(
                        f"{label}: messages nested deeper than protobuf's limit of 100 "
                        "(about 31 levels of subgraphs); refused") from e
                raise FormatError(f"{label}: not a valid ONNX protobuf (truncated, damaged or "
                                  f"not an ONNX file): {e}") from e
            finally:
                view.release()
                mm.close()
    finally:
        os.close(fd)
    if not model.HasField("graph"):
        raise FormatError(f"{label}: not an ONNX model: no graph found (empty, truncated or "
                          "another kind of file?)")
    if model.ir_version >= 3 and not model.opset_import:
        raise FormatError(f"{label}: model has no opset_import (file truncated?)")
    return model, ident(st)


def facts(model: Any, items: list[Item], files: ExternalFiles) -> dict[str, Any]:
    """The snapshot's ``source`` metadata: producer, opsets, real inputs and outputs, counts.

    ``n_params``/``n_weights`` count the weights the model computes with (not the
    tensors kept only to rebuild them, nor constants).
    """

    def io(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tt.shape.dim] if tt.HasField(
                "shape") else None
            out.append({"name": v.name, "elem_type": tt.elem_type, "shape": dims})
        return out

    inits = {t.name for t in model.graph.initializer}
    effective = [it for it in items if not it.attrs.get("constant")
                 and it.attrs.get("effective", True)]
    return {
        "format": "onnx", "ir_version": int(model.ir_version),
        "opset_import": {o.domain or "ai.onnx": int(o.version) for o in model.opset_import},
        "producer_name": model.producer_name, "producer_version": model.producer_version,
        "domain": model.domain, "model_version": int(model.model_version),
        "doc_string": model.doc_string[:1000], "graph_name": model.graph.name,
        "metadata_props": {p.key: p.value for p in model.metadata_props},
        "inputs": io(i for i in model.graph.input if i.name not in inits),
        "outputs": io(model.graph.output),
        "n_weights": len(effective), "n_params": sum(it.value.numel for it in effective),
        "n_tensors": len(items),
        "external_files": sorted(files.files),
    }
