"""Saliency and integrated gradients: the weightatlas executor against Captum, side by side.

The same ResNet-18 (tests/models.py, 1000 classes) runs in PyTorch under Captum and, exported
with ``torch.onnx.export``, in the executor. For a batch of 8 images it times

- the input gradient (``Saliency``, absolute values) and
- integrated gradients (50 Gauss-Legendre steps, internal batch 50),

interleaving the implementations in each repeat. For saliency it also times ResNet-18
written directly in JAX (NHWC, plain ``lax`` calls), to compare the executor with plain
JAX. The executor's first call traces and compiles; it is printed separately, and the
steady-state times are medians of the later calls. Attributions are compared (relative
L2) with Captum's, and the saliency of both with PyTorch's float64 result. The load
average is printed at the start and the end: on a shared machine PyTorch slows down far
more than XLA, so only runs on an otherwise idle machine give representative ratios.

    .venv/bin/python bench/saliency.py [--size 224] [--batch 8] [--steps 50] [--repeats 3]
        [--only saliency]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def plain_jax_resnet18(state: dict[str, np.ndarray]) -> Callable[[Any], Any]:
    """ResNet-18 written directly in JAX (NHWC, batch norm in inference form), the
    baseline the executor must not be slower than."""
    import jax
    import jax.numpy as jnp

    p = {k: (v.transpose(2, 3, 1, 0) if v.ndim == 4 else v) for k, v in state.items()}

    def conv(x: Any, w: Any, stride: int, pad: int) -> Any:
        return jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def bn(x: Any, n: str) -> Any:
        scale = p[n + ".weight"] / np.sqrt(p[n + ".running_var"] + 1e-5)
        return x * scale + (p[n + ".bias"] - p[n + ".running_mean"] * scale)

    def block(x: Any, n: str, stride: int) -> Any:
        out = jax.nn.relu(bn(conv(x, p[n + ".conv1.weight"], stride, 1), n + ".bn1"))
        out = bn(conv(out, p[n + ".conv2.weight"], 1, 1), n + ".bn2")
        if n + ".downsample.0.weight" in p:
            x = bn(conv(x, p[n + ".downsample.0.weight"], stride, 0), n + ".downsample.1")
        return jax.nn.relu(out + x)

    def forward(x: Any) -> Any:
        x = jax.nn.relu(bn(conv(x, p["conv1.weight"], 2, 3), "bn1"))
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                  ((0, 0), (1, 1), (1, 1), (0, 0)))
        for i, stride in zip(range(1, 5), (1, 2, 2, 2), strict=True):
            x = block(block(x, f"layer{i}.0", stride), f"layer{i}.1", 1)
        return jnp.mean(x, axis=(1, 2)) @ p["fc.weight"].T + p["fc.bias"]

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--internal-batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ig-repeats", type=int, default=2)
    parser.add_argument("--only", choices=("saliency", "integrated gradients"),
                        help="time one attribution only")
    args = parser.parse_args()

    import jax
    import torch
    from captum.attr import IntegratedGradients, Saliency

    from tests.models import resnet18
    from weightatlas.core.executor import from_onnx, integrated_gradients, saliency

    module = resnet18(seed=0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    targets = np.arange(args.batch) * 7 % 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.onnx.export(module, (x,), dynamo=True, verbose=False).model_proto
    fn = from_onnx(model)
    xn = x.numpy()
    target_t = torch.from_numpy(targets)
    leaf = x.clone().requires_grad_(True)

    def captum_saliency() -> np.ndarray:
        return Saliency(module).attribute(leaf, target=target_t).numpy()

    def ours_saliency() -> np.ndarray:
        return saliency(fn, xn, targets)

    import jax.numpy as jnp

    plain = plain_jax_resnet18({k: v.numpy() for k, v in module.state_dict().items()})
    rows_t = jnp.asarray(targets)
    plain_grad = jax.jit(jax.grad(lambda x: jnp.sum(
        jnp.take_along_axis(plain(x), rows_t[:, None], axis=1))))
    x_nhwc = xn.transpose(0, 2, 3, 1)

    def plain_saliency() -> np.ndarray:
        return np.abs(np.asarray(plain_grad(x_nhwc))).transpose(0, 3, 1, 2)

    def captum_ig() -> np.ndarray:
        return IntegratedGradients(module).attribute(
            leaf, target=target_t, n_steps=args.steps,
            internal_batch_size=args.internal_batch).detach().numpy()

    def ours_ig() -> np.ndarray:
        return integrated_gradients(fn, xn, targets, steps=args.steps,
                                    internal_batch_size=args.internal_batch)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), jax {jax.__version__} "
          f"({jax.devices()[0].platform})")
    print(f"ResNet-18, batch {args.batch}, {args.size}x{args.size}, "
          f"IG {args.steps} steps (gausslegendre), internal batch {args.internal_batch}")
    print("load average at start: {:.2f} {:.2f} {:.2f}\n".format(*os.getloadavg()))

    rows = []
    firsts, captums = {}, {}
    for name, ours, theirs, repeats in (("saliency", ours_saliency, captum_saliency,
                                         args.repeats),
                                        ("integrated gradients", ours_ig, captum_ig,
                                         args.ig_repeats)):
        if args.only and name != args.only:
            continue
        first_s, first = timed(ours)
        _, expected = timed(theirs)
        firsts[name], captums[name] = first, expected
        print(f"{name}: relative L2 to Captum {rel(first, expected):.2e}; executor's first "
              f"call (trace + compile + one run) {first_s:.2f} s", flush=True)
        mine, captum = [], []
        plain_times: list[float] = []
        if name == "saliency":
            print(f"  plain JAX: relative L2 to the executor "
                  f"{rel(plain_saliency(), first):.1e}", flush=True)
        for _ in range(repeats):
            mine.append(timed(ours)[0])
            captum.append(timed(theirs)[0])
            if name == "saliency":
                plain_times.append(timed(plain_saliency)[0])
        m, c = statistics.median(mine), statistics.median(captum)
        rows.append((name, c, m, first_s))
        print(f"  executor {m:.2f} s, Captum {c:.2f} s, ratio {m / c:.2f}", flush=True)
        if plain_times:
            p = statistics.median(plain_times)
            print(f"  plain JAX ResNet-18 (NHWC) {p:.2f} s: executor / plain JAX "
                  f"{m / p:.2f}", flush=True)

    # Accuracy: both float32 results against PyTorch in float64 on the same input.
    if "saliency" not in firsts:
        firsts["saliency"], captums["saliency"] = ours_saliency(), captum_saliency()
    exact = leaf.detach().double().requires_grad_(True)
    module.double()(exact)[torch.arange(args.batch), target_t].sum().backward()
    module.float()
    reference = np.abs(exact.grad.numpy())
    ours_error = rel(firsts["saliency"], reference)
    captum_error = rel(captums["saliency"], reference)
    print(f"saliency against float64 PyTorch: executor {ours_error:.1e}, "
          f"Captum (float32 PyTorch) {captum_error:.1e}", flush=True)

    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print("\n| attribution | Captum | executor (compiled) | ratio | executor first call |")
    print("|---|---|---|---|---|")
    for name, c, m, first_s in rows:
        print(f"| {name} | {c:.2f} s | {m:.2f} s | **{m / c:.2f}** | {first_s:.1f} s |")


if __name__ == "__main__":
    main()
