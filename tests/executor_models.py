"""Small standard architectures in plain torch.nn, for the executor's parity tests.

ResNet-18 comes from tests/models.py; these add a VGG-style network (no batch norm, so
its convolution weights survive export unchanged), a MobileNet-style network (depthwise
convolutions, ReLU6, hard-swish, squeeze-and-excitation) and a small transformer encoder
over token ids (embedding, multi-head self-attention, LayerNorm, GELU).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import onnx
import torch
from torch import nn


class VGGStyle(nn.Module):
    """VGG-11's layout at a tenth of the width, for 32x32 inputs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (8, "M", 16, "M", 32, 32, "M", 64, 64, "M"):
            if cout == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(cout), 3, padding=1), nn.ReLU(inplace=True)]
                cin = int(cout)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 32),
                                        nn.ReLU(inplace=True), nn.Dropout(0.5),
                                        nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        return x * s


class InvertedResidual(nn.Module):
    """MobileNetV3's block: expand 1x1, depthwise 3x3, squeeze-excite, project 1x1."""

    def __init__(self, cin: int, hidden: int, cout: int, stride: int, se: bool) -> None:
        super().__init__()
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            SqueezeExcite(hidden, max(hidden // 4, 4)) if se else nn.Identity(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetStyle(nn.Module):
    """A MobileNetV3-small-like network for 32x32 inputs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.Hardswish())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 32, 16, 1, se=True),
            InvertedResidual(16, 48, 24, 2, se=False),
            InvertedResidual(24, 72, 24, 1, se=True),
            InvertedResidual(24, 96, 40, 2, se=True))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 64),
                                  nn.Hardswish(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        y = torch.softmax(scores, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyEncoder(nn.Module):
    """A pre-norm transformer encoder over token ids, mean-pooled into a classifier."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, hidden: int = 64,
                 layers: int = 2, length: int = 12, num_classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, hidden) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[:, : tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with non-trivial batch-norm statistics, deterministically."""
    torch.manual_seed(seed)
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.kaiming_normal_(p)
        elif p.dim() == 1:
            nn.init.uniform_(p, -0.1, 0.1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@functools.cache
def exported(name: str) -> tuple[nn.Module, torch.Tensor, onnx.ModelProto]:
    """(PyTorch module in eval mode, an example input, its ONNX export), built once per
    test session for ``resnet18``, ``vgg``, ``mobilenet`` or ``encoder``."""
    from tests.models import resnet18

    torch.manual_seed(0)
    built: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
        "resnet18": lambda: (resnet18(seed=0, num_classes=10), torch.randn(2, 3, 64, 64)),
        "vgg": lambda: (seeded(VGGStyle()), torch.randn(2, 3, 32, 32)),
        "mobilenet": lambda: (seeded(MobileNetStyle()), torch.randn(2, 3, 32, 32)),
        "encoder": lambda: (seeded(TinyEncoder()), torch.randint(0, 50, (3, 12))),
    }
    module, x = built[name]()
    with warnings.catch_warnings():
        # torch.export's own deprecation, raised inside torch.onnx.export.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`",
                                category=FutureWarning)
        program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
    return module, x, program.model_proto
