"""The demo: a real model trained on scikit-learn's digits, saved as safetensors.

``python -m weightatlas._demo OUT`` trains a 64-32-10 multilayer perceptron on the
8x8 digits bundled with scikit-learn (no download), and writes its weights in
PyTorch layout (``fc1.weight`` is ``[out, in]``) at three training steps, as
``OUT/checkpoints/step-<N>/model.safetensors``. ``make demo`` then ingests them
with the CLI and shows what the store holds.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

from weightatlas.adapters.safetensors import write

__all__ = ["STEPS", "train_digits_mlp"]

#: Training epochs after which a checkpoint is written.
STEPS = (1, 10, 60)


def train_digits_mlp(out_dir: str, steps: tuple[int, ...] = STEPS, seed: int = 0) -> list[str]:
    """Train the digits MLP and write one safetensors checkpoint per step in ``steps``.

    Returns the paths written. The test accuracy at each step goes into the file's
    ``__metadata__``.
    """
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed)
    clf = MLPClassifier(hidden_layer_sizes=(64, 32), random_state=seed, learning_rate_init=1e-3)
    classes = np.unique(y)
    paths = []
    epoch = 0
    for step in sorted(steps):
        while epoch < step:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.partial_fit(x_train, y_train, classes=classes)
            epoch += 1
        accuracy = float(clf.score(x_test, y_test))
        tensors = {}
        for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True), start=1):
            # scikit-learn keeps [in, out]; PyTorch layout, which safetensors files hold,
            # is [out, in].
            tensors[f"fc{i}.weight"] = np.ascontiguousarray(w.T, dtype=np.float32)
            tensors[f"fc{i}.bias"] = b.astype(np.float32)
        path = os.path.join(out_dir, "checkpoints", f"step-{step}", "model.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(tensors, path, metadata={"epoch": str(step), "test_accuracy": f"{accuracy:.4f}",
                                       "data": "sklearn.datasets.load_digits"})
        print(f"step {step:>3}: test accuracy {accuracy:.3f} -> {path}")
        paths.append(path)
    return paths


if __name__ == "__main__":
    train_digits_mlp(sys.argv[1] if len(sys.argv) > 1 else "demo_out")
