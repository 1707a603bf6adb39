"""The demo: a real model trained on scikit-learn's digits, saved as safetensors.

``python -m weightatlas._demo OUT`` trains a 64-32-10 multilayer perceptron on the
8x8 digits bundled with scikit-learn (no download), and writes its weights in
PyTorch layout (``fc1.weight`` is ``[out, in]``) at three training steps, as
``OUT/checkpoints/step-<N>/model.safetensors``. The last step is also written as an
ONNX graph (``OUT/digits-mlp.onnx``: ``Flatten`` of the 8x8 image, then
``Gemm``/``Relu``/``Gemm``/``Relu``/``Gemm``, the weights as scikit-learn keeps them,
``[in, out]``), with one test digit per class as ``OUT/digits.npy`` (``[10, 1, 8, 8]``,
pixels in 0..1) and their labels. ``make demo`` then
ingests them with the CLI, shows what the store holds, and runs the stored ONNX model
for attributions and weight gradients.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

from weightatlas.adapters.safetensors import write

__all__ = ["STEPS", "mlp_onnx", "train_digits_mlp"]

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
    onnx_path = os.path.join(out_dir, "digits-mlp.onnx")
    with open(onnx_path, "wb") as f:
        f.write(mlp_onnx(clf.coefs_, clf.intercepts_, image=(1, 8, 8)))
    picks = [int(np.flatnonzero(y_test == c)[0]) for c in classes]
    np.save(os.path.join(out_dir, "digits.npy"),
            x_test[picks].astype(np.float32).reshape(-1, 1, 8, 8))
    np.save(os.path.join(out_dir, "labels.npy"), y_test[picks].astype(np.int64))
    print(f"final model as ONNX -> {onnx_path}; one test digit per class -> "
          f"{os.path.join(out_dir, 'digits.npy')}")
    return paths


def mlp_onnx(coefs: list[np.ndarray], intercepts: list[np.ndarray],
             image: tuple[int, ...] | None = None) -> bytes:
    """A scikit-learn MLP (ReLU hidden layers, logits out) as a serialized ONNX model,
    reading images of shape ``[batch, *image]`` flattened (``image=None``: vectors).

    Example:
        >>> import onnxruntime as ort
        >>> w = [np.eye(2, 3, dtype=np.float32), np.ones((3, 2), np.float32)]
        >>> b = [np.zeros(3, np.float32), np.arange(2, dtype=np.float32)]
        >>> sess = ort.InferenceSession(mlp_onnx(w, b), providers=["CPUExecutionProvider"])
        >>> sess.run(None, {"x": np.array([[1.0, -1.0]], np.float32)})[0]
        array([[1., 2.]], dtype=float32)
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, value = [], [], "x"
    if image is not None:
        nodes.append(helper.make_node("Flatten", ["x"], ["/flatten/Flatten_output_0"],
                                      name="/flatten/Flatten", axis=1))
        value = "/flatten/Flatten_output_0"
    for i, (w, b) in enumerate(zip(coefs, intercepts, strict=True), start=1):
        inits += [numpy_helper.from_array(np.asarray(w, np.float32), f"fc{i}.weight"),
                  numpy_helper.from_array(np.asarray(b, np.float32), f"fc{i}.bias")]
        out = f"/fc{i}/Gemm_output_0"
        nodes.append(helper.make_node("Gemm", [value, f"fc{i}.weight", f"fc{i}.bias"], [out],
                                      name=f"/fc{i}/Gemm"))
        value = out
        if i < len(coefs):
            value = f"/relu{i}/Relu_output_0"
            nodes.append(helper.make_node("Relu", [out], [value], name=f"/relu{i}/Relu"))
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                       ["batch", *(image or (coefs[0].shape[0],))])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT,
                                       ["batch", coefs[-1].shape[1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="weightatlas._demo")
    return bytes(model.SerializeToString())


if __name__ == "__main__":
    train_digits_mlp(sys.argv[1] if len(sys.argv) > 1 else "demo_out")
