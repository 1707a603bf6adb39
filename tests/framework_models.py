"""Real models for the framework tests, written in plain torch.nn, Flax and Equinox.

The same architectures exist in two frameworks where the tests move weights between
them (a small transformer encoder, a small CNN); the ``*_to_flax`` / ``*_to_torch``
functions do the move by hand, layout by layout, so the tests check the adapters'
canonical forms against an independent mapping (and the forward passes against each
other). Seeds are fixed; nothing is downloaded.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

# ---- PyTorch ---------------------------------------------------------------------------


class VGGStyle(nn.Module):
    """A small VGG: 3x3 conv-BN-ReLU stacks with max-pooling, then a classifier."""

    def __init__(self, cfg: tuple[int | str, ...] = (16, "M", 32, 32, "M", 64, 64, "M"),
                 num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(v), 3, padding=1), nn.BatchNorm2d(int(v)),
                           nn.ReLU(inplace=True)]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(channels * 4, 128), nn.ReLU(True),
                                        nn.Dropout(0.0), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg_style(seed: int = 0) -> VGGStyle:
    torch.manual_seed(seed)
    return VGGStyle().eval()


class LSTMTagger(nn.Module):
    """Embedding, a two-layer bidirectional LSTM, a GRU and a linear head."""

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 24, tags: int = 7) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, tags)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(x))
        h, _ = self.gru(h)
        return self.head(h)


def lstm_tagger(seed: int = 0) -> LSTMTagger:
    torch.manual_seed(seed)
    return LSTMTagger().eval()


class TorchTransformer(nn.Module):
    """Token and position embeddings, post-norm encoder layers, a linear head."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, ff: int = 64,
                 layers: int = 2, seq: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True)
            for _ in range(layers))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def torch_transformer(seed: int = 0) -> TorchTransformer:
    torch.manual_seed(seed)
    model = TorchTransformer().eval()
    with torch.no_grad():  # LayerNorms as after training, not all ones and zeros
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


class TorchCNN(nn.Module):
    """The digits CNN of :func:`flax_cnn`, in PyTorch (NCHW)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


# ---- Flax ------------------------------------------------------------------------------


def flax_modules() -> dict[str, type]:
    """The Flax Linen twins (built on demand: flax imports are not free)."""
    import flax.linen as fnn

    class Block(fnn.Module):
        dim: int
        heads: int
        ff: int

        @fnn.compact
        def __call__(self, x):  # type: ignore[no-untyped-def]
            a = fnn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim,
                                                 out_features=self.dim, deterministic=True,
                                                 name="self_attn")(x, x)
            x = fnn.LayerNorm(epsilon=1e-5, name="norm1")(x + a)
            f = fnn.Dense(self.dim, name="linear2")(fnn.relu(fnn.Dense(self.ff,
                                                                         name="linear1")(x)))
            return fnn.LayerNorm(epsilon=1e-5, name="norm2")(x + f)

    class FlaxTransformer(fnn.Module):
        vocab: int = 64
        dim: int = 32
        heads: int = 4
        ff: int = 64
        layers: int = 2
        seq: int = 12
        classes: int = 5

        @fnn.compact
        def __call__(self, x):  # type: ignore[no-untyped-def]
            import jax.numpy as jnp

            h = fnn.Embed(self.vocab, self.dim, name="tok")(x)
            h = h + fnn.Embed(self.seq, self.dim, name="pos")(jnp.arange(x.shape[1]))
            for i in range(self.layers):
                h = Block(self.dim, self.heads, self.ff, name=f"layers_{i}")(h)
            return fnn.Dense(self.classes, name="head")(h)

    class FlaxCNN(fnn.Module):
        @fnn.compact
        def __call__(self, x):  # type: ignore[no-untyped-def]
            x = fnn.relu(fnn.Conv(8, (3, 3), padding="SAME")(x))
            x = fnn.relu(fnn.Conv(16, (3, 3), padding="SAME")(x))
            return fnn.Dense(10)(x.mean(axis=(1, 2)))

    return {"FlaxTransformer": FlaxTransformer, "FlaxCNN": FlaxCNN}


def transformer_to_flax(model: TorchTransformer) -> dict:
    """The torch transformer's weights as Flax ``params``, moved layout by layout."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim = model.tok.weight.shape[1]
    heads = model.layers[0].self_attn.num_heads
    hd = dim // heads
    params: dict = {"tok": {"embedding": sd["tok.weight"]},
                    "pos": {"embedding": sd["pos.weight"]}}
    for i in range(len(model.layers)):
        p = f"layers.{i}."
        w, b = sd[p + "self_attn.in_proj_weight"], sd[p + "self_attn.in_proj_bias"]
        attn = {}
        for j, name in enumerate(("query", "key", "value")):
            wj = w[j * dim:(j + 1) * dim]  # [out, in]
            attn[name] = {"kernel": wj.T.reshape(dim, heads, hd),
                          "bias": b[j * dim:(j + 1) * dim].reshape(heads, hd)}
        attn["out"] = {"kernel": sd[p + "self_attn.out_proj.weight"].T.reshape(heads, hd, dim),
                       "bias": sd[p + "self_attn.out_proj.bias"]}
        params[f"layers_{i}"] = {
            "self_attn": attn,
            "norm1": {"scale": sd[p + "norm1.weight"], "bias": sd[p + "norm1.bias"]},
            "linear1": {"kernel": sd[p + "linear1.weight"].T, "bias": sd[p + "linear1.bias"]},
            "linear2": {"kernel": sd[p + "linear2.weight"].T, "bias": sd[p + "linear2.bias"]},
            "norm2": {"scale": sd[p + "norm2.weight"], "bias": sd[p + "norm2.bias"]},
        }
    params["head"] = {"kernel": sd["head.weight"].T, "bias": sd["head.bias"]}
    return {"params": _contiguous(params)}


def _contiguous(tree: dict) -> dict:
    return {k: _contiguous(v) if isinstance(v, dict) else np.ascontiguousarray(v)
            for k, v in tree.items()}


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as NHWC float32 images in [0, 1] and int labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1), y.astype(np.int32)


@functools.cache
def train_flax_cnn(steps: int = 100, seed: int = 0) -> tuple[dict, float]:
    """The Flax CNN trained ``steps`` Adam steps on digits; returns (variables, accuracy).

    Cached: several test modules use it, and compiling the training step takes seconds.
    """
    import jax
    import optax

    model = flax_modules()["FlaxCNN"]()
    x, y = digits_data()
    variables = model.init(jax.random.key(seed), x[:1])
    tx = optax.adam(1e-2)
    opt = tx.init(variables["params"])

    def loss(params, xb, yb):  # type: ignore[no-untyped-def]
        logits = model.apply({"params": params}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(params, opt, xb, yb):  # type: ignore[no-untyped-def]
        g = jax.grad(loss)(params, xb, yb)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt

    params = variables["params"]
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(x), 128)
        params, opt = step(params, opt, x[idx], y[idx])
    accuracy = float((model.apply({"params": params}, x).argmax(-1) == y).mean())
    return {"params": jax.tree_util.tree_map(np.asarray, params)}, accuracy


def cnn_to_torch(variables: dict) -> TorchCNN:
    """The Flax CNN's weights in a :class:`TorchCNN` (HWIO -> OIHW, [in, out] -> [out, in])."""
    p = variables["params"]
    model = TorchCNN().eval()
    with torch.no_grad():
        for conv, name in ((model.conv1, "Conv_0"), (model.conv2, "Conv_1")):
            conv.weight.copy_(torch.from_numpy(np.asarray(p[name]["kernel"]).transpose(3, 2, 0, 1)
                                               .copy()))
            conv.bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"]).copy()))
        model.fc.weight.copy_(torch.from_numpy(np.asarray(p["Dense_0"]["kernel"]).T.copy()))
        model.fc.bias.copy_(torch.from_numpy(np.asarray(p["Dense_0"]["bias"]).copy()))
    return model
