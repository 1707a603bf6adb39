"""Live-capture benchmark (issue 6): training steps with and without ``track``.

A PyTorch MLP (784-1024-1024-10, 1.9 M parameters, batch 256, SGD) is trained for
``--steps`` steps on synthetic data, alternately without and with
``weightatlas.track(model, store, every=100)`` (the default interval), and with
gradients too. Target: tracking slows a training step by at most 5%.

    python bench/track.py [--steps 600] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightatlas._track import track  # noqa: E402


def train(steps: int, store_dir: str | None, gradients: bool = False) -> float:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(256, 784)
    y = torch.randint(0, 10, (256,))
    tracker = track(net, store_dir, model="mlp", gradients=gradients) if store_dir else None
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    if tracker is not None:
        tracker.close()  # the last snapshot is written before the clock stops
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    train(20, None)  # warm up
    plain, tracked, with_grads = [], [], []
    for _ in range(args.repeats):
        plain.append(train(args.steps, None))
        with tempfile.TemporaryDirectory() as tmp:
            tracked.append(train(args.steps, str(Path(tmp) / "store")))
        with tempfile.TemporaryDirectory() as tmp:
            with_grads.append(train(args.steps, str(Path(tmp) / "store"), gradients=True))
    p, t, g = (statistics.median(v) * 1e3 for v in (plain, tracked, with_grads))
    print(f"MLP 1.9 M parameters, {args.steps} steps, snapshot every 100 steps "
          f"(median of {args.repeats})")
    print(f"  plain training         {p:7.2f} ms/step")
    print(f"  with track()           {t:7.2f} ms/step  ({(t / p - 1) * 100:+.1f}%, target <= +5%)")
    print(f"  with track(gradients)  {g:7.2f} ms/step  ({(g / p - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
