"""Live capture during training: a PyTorch optimizer hook and a JAX/optax loop."""

from __future__ import annotations

import numpy as np
import pytest

from weightatlas._track import Tracker, track
from weightatlas.errors import SnapshotExistsError, StoreError
from weightatlas.storage import RecordsSource, Store, TensorRecord


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16).astype(np.float32), y


def test_torch_hook_captures_weights_and_gradients_at_the_right_steps(store: Store):
    torch = pytest.importorskip("torch")
    x, y = digits()
    xt, yt = torch.tensor(x), torch.tensor(y)

    def run(hooked: bool):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
        opt = torch.optim.SGD(net.parameters(), lr=0.3)
        other = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # not tracked
        seen = {}
        tracker = track(net, store, model="digits", every=3, gradients=True) if hooked else None
        for step in range(1, 8):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt), yt).backward()
            opt.step()
            other.step()
            seen[step] = ({k: v.detach().clone().numpy() for k, v in net.state_dict().items()},
                          {k: p.grad.clone().numpy() for k, p in net.named_parameters()})
        if tracker is not None:
            tracker.close()
            assert sorted(tracker.steps_written) == [0, 3, 6]
        return seen

    reference = run(hooked=False)
    run(hooked=True)
    assert [i.step for i in store.snapshots("digits")] == [0, 3, 6]
    snap = store.snapshot("digits@6")
    weights, grads = reference[6]
    for name, value in weights.items():
        np.testing.assert_array_equal(snap.read(name), value)
        np.testing.assert_array_equal(snap.read(f"{name}.grad"), grads[name])
    assert snap.info("0.weight.grad").kind == "linear"
    assert '"gradient"' in snap.info("0.weight.grad").attrs
    assert "0.weight.grad" not in store.snapshot("digits@0")  # before any backward


def test_jax_loop_logs_params_and_gradients(store: Store):
    jnp = pytest.importorskip("jax.numpy")
    import jax

    params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}

    def loss(p, x):
        return jnp.sum((x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) ** 2)

    x = jnp.arange(8.0).reshape(2, 4) / 10
    with Tracker(store, "flax", every=2) as tracker:
        for step in range(5):
            grads = jax.grad(loss)(params, x)
            logged = tracker.log(step, params, grads)
            assert logged == (step % 2 == 0)
            params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
    assert [i.step for i in store.snapshots("flax")] == [0, 2, 4]
    snap = store.snapshot("flax@4")
    names = snap.names
    assert "Dense_0.kernel" in names and "Dense_0.kernel.grad" in names
    # Flax kernels are [in, out]; stored canonically as [out, in], gradients alike.
    assert snap.info("Dense_0.kernel.grad").layout == ("out", "in")
    np.testing.assert_allclose(snap.read("Dense_0.kernel.grad", layout="source"),
                               np.asarray(jax.grad(loss)(_params_at(4), x)["Dense_0"]["kernel"]),
                               rtol=1e-6)


def _params_at(step: int):
    import jax
    import jax.numpy as jnp

    params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    x = jnp.arange(8.0).reshape(2, 4) / 10

    def loss(p, x):
        return jnp.sum((x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) ** 2)

    for _ in range(step):
        grads = jax.grad(loss)(params, x)
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
    return params


def test_writing_errors_reach_the_training_loop(store: Store):
    store.write(RecordsSource([TensorRecord("w", np.ones(2))]), "run", step=0)
    tracker = Tracker(store, "run", every=1)
    tracker.log(0, {"w": np.zeros(2)})  # conflicts with the existing step 0
    with pytest.raises(SnapshotExistsError, match="run@0 already exists"):
        tracker.flush()
    tracker.close()
    with pytest.raises(StoreError, match="every must be at least 1"):
        Tracker(store, "run", every=0)
