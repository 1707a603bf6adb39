"""Plain torch.nn architectures exported to ONNX by the ONNX adapter's tests.

ResNet-18 lives in ``tests/models.py``; here are the other styles the issue names, at
small widths so that exporting them all takes seconds: a VGG-style stack of 3x3
convolutions, a MobileNet-style depthwise-separable network, a small BERT-style
transformer encoder (module names as Hugging Face writes them, so the exporters'
scopes read ``/encoder/layer.0/attention/self/query/MatMul``) and an LSTM/GRU
sequence model. Each builder seeds torch and gives BatchNorm non-trivial statistics,
as a trained network has.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _seeded(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.num_batches_tracked.fill_(10)
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


class VGG(nn.Module):
    """VGG-style: blocks of 3x3 convolutions and max pooling, then three Linear layers."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c * 4 * 4, 64), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.pointwise(self.act(self.bn1(self.depthwise(x))))))


class MobileNet(nn.Module):
    """MobileNet-v1 style: a stem, depthwise-separable blocks, a grouped conv, a Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(DepthwiseSeparable(16, 32, 1), DepthwiseSeparable(32, 64, 2),
                                    DepthwiseSeparable(64, 64, 1))
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        out = torch.softmax(scores, dim=-1) @ v
        return out.transpose(1, 2).reshape(b, t, d)


class AttentionOutput(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.LayerNorm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self = SelfAttention(dim, heads)
        self.output = AttentionOutput(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class Intermediate(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attention = Attention(dim, heads)
        self.intermediate = Intermediate(dim, hidden)
        self.output = AttentionOutput(dim)
        self.output.dense = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(dim, heads, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class Embeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.LayerNorm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))


class TransformerEncoder(nn.Module):
    """A small BERT: embeddings, encoder layers with self-attention, a classifier head."""

    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 4, hidden: int = 64,
                 layers: int = 2, max_len: int = 16, num_classes: int = 3) -> None:
        super().__init__()
        self.embeddings = Embeddings(vocab, dim, max_len)
        self.encoder = Encoder(dim, heads, hidden, layers)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(self.embeddings(ids))[:, 0])


class Recurrent(nn.Module):
    """An embedding, a two-layer bidirectional LSTM, a GRU and a Linear head."""

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 24,
                 num_classes: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x, _ = self.lstm(self.embedding(ids))
        x, _ = self.gru(x)
        return self.head(x[:, -1])


def vgg(seed: int = 0) -> VGG:
    torch.manual_seed(seed)
    return _seeded(VGG())  # type: ignore[return-value]


def mobilenet(seed: int = 0) -> MobileNet:
    torch.manual_seed(seed)
    return _seeded(MobileNet())  # type: ignore[return-value]


def transformer(seed: int = 0) -> TransformerEncoder:
    torch.manual_seed(seed)
    return _seeded(TransformerEncoder())  # type: ignore[return-value]


def recurrent(seed: int = 0) -> Recurrent:
    torch.manual_seed(seed)
    return _seeded(Recurrent())  # type: ignore[return-value]


# ---- exporting and checking -------------------------------------------------------------

#: The example inputs each architecture is exported with.
def example_input(name: str) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    if name in ("transformer",):
        return (torch.randint(0, 100, (2, 8)),)
    if name in ("recurrent",):
        return (torch.randint(0, 50, (2, 7)),)
    return (torch.randn(1, 3, 32, 32),)


def export(model: nn.Module, args: tuple[torch.Tensor, ...], path: str, style: str) -> str:
    """Export with the TorchScript exporter (``ts``; ``tsnf`` without constant folding)
    or the dynamo exporter (``dy``; ``dyno`` without its optimizer)."""
    import contextlib
    import io
    import warnings

    kwargs: dict[str, object] = {
        "ts": {"dynamo": False, "opset_version": 17},
        "tsnf": {"dynamo": False, "opset_version": 17, "do_constant_folding": False},
        "dy": {"dynamo": True},
        "dyno": {"dynamo": True, "optimize": False},
    }[style]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # The TorchScript exporter is deprecated (DeprecationWarning) and the dynamo
        # exporter's tree utilities warn (FutureWarning): neither concerns these tests.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, path, **kwargs)  # type: ignore[arg-type]
    return path


#: Operators whose outputs can be computed from constants alone (for the reference).
CONSTANT_OPS = frozenset({"Constant", "ConstantOfShape", "Identity", "Transpose", "Cast",
                          "CastLike", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
                          "DequantizeLinear"})
#: onnxruntime's Python API cannot return these element types: compare them as float32.
_AS_FLOAT = {16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26}


def ort_values(model_path: str, names: list[str]) -> dict[str, object]:
    """What onnxruntime computes for constant values of a model's main graph.

    The model is cut down to its initializers and the nodes computable from them
    (Constant, Transpose, Cast, DequantizeLinear...), every requested value becomes an
    output (cast to float32 when onnxruntime cannot hand the type to NumPy, which is
    exact for the narrower float types), and onnxruntime runs it.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(model_path)
    g = model.graph
    known = {t.name for t in g.initializer} | {s.values.name for s in g.sparse_initializer}
    nodes = []
    for node in g.node:
        if node.op_type in CONSTANT_OPS and all(i in known for i in node.input if i):
            nodes.append(node)
            known.update(node.output)
    wanted = [n for n in names if n in known]
    needed, keep = set(wanted), []
    for node in reversed(nodes):  # only what the requested values need
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    nodes = keep[::-1]
    probe = helper.make_graph(nodes, "probe", [], [], list(g.initializer),
                              sparse_initializer=list(g.sparse_initializer))
    pm = helper.make_model(probe, opset_imports=list(model.opset_import))
    pm.ir_version = max(model.ir_version, 7)
    inferred = onnx.shape_inference.infer_shapes(pm)
    types = {t.name: t.data_type for t in g.initializer}
    types.update({s.values.name: s.values.data_type for s in g.sparse_initializer})
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info})
    types.update({n.output[0]: n.attribute[0].t.data_type for n in nodes
                  if n.op_type == "Constant" and n.attribute[0].name == "value"})
    for k, name in enumerate(wanted):
        elem = types[name]
        cast = elem in _AS_FLOAT
        op = helper.make_node("Cast", [name], [f"probe_{k}"], to=1) if cast else \
            helper.make_node("Identity", [name], [f"probe_{k}"])
        pm.graph.node.append(op)
        pm.graph.output.append(helper.make_tensor_value_info(f"probe_{k}", 1 if cast else elem,
                                                             None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(pm.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    results = session.run(None, {})
    return dict(zip(wanted, results, strict=True))
