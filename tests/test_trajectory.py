"""Training trajectories against known updates and a real SGD run on digits."""

from __future__ import annotations

import numpy as np
import pytest

from weightatlas.core.trajectory import trajectory
from weightatlas.errors import ShapeError
from weightatlas.storage import RecordsSource, Store, TensorRecord


def test_known_updates(store: Store, rng):
    w0 = rng.standard_normal((4, 5))
    d1, d2 = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    states = [w0, w0 + d1, w0 + d1 + d2, w0 + d1 + d2 - d2]  # last step undoes the second
    for step, w in zip((0, 10, 20, 30), states, strict=True):
        store.write(RecordsSource([TensorRecord("w", w)]), "m", step=step)
    store.write(RecordsSource([TensorRecord("w", w0 * 9)]), "m", tag="best")  # no step: ignored
    rows = trajectory(store, "m").to_pylist()
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    assert [r["status"] for r in rows] == ["first", "ok", "ok", "ok"]
    norm = np.linalg.norm
    assert rows[1]["update_norm"] == pytest.approx(norm(d1), rel=1e-12)
    assert rows[1]["relative_update"] == pytest.approx(norm(d1) / norm(w0), rel=1e-12)
    assert rows[2]["update_cosine"] == pytest.approx(
        (d1 * d2).sum() / (norm(d1) * norm(d2)), rel=1e-9)
    assert rows[3]["update_cosine"] == pytest.approx(-1.0, rel=1e-12)
    assert rows[2]["distance_from_init"] == pytest.approx(norm(d1 + d2), rel=1e-12)
    assert rows[3]["relative_distance"] == pytest.approx(norm(d1) / norm(w0), rel=1e-12)
    assert rows[0]["update_norm"] is None and rows[1]["update_cosine"] is None


def test_sgd_updates_are_learning_rate_times_gradient(store: Store):
    torch = pytest.importorskip("torch")
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xt, yt = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    grad_norms = []

    def save(step: int) -> None:
        recs = [TensorRecord(k, v.detach().numpy().copy()) for k, v in model.state_dict().items()]
        store.write(RecordsSource(recs), "digits", step=step)

    save(0)
    for step in range(1, 6):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        grad_norms.append(model[0].weight.grad.double().norm().item())
        opt.step()
        save(step)
    rows = [r for r in trajectory(store, "digits").to_pylist() if r["tensor"] == "0.weight"]
    measured = [r["update_norm"] for r in rows[1:]]
    np.testing.assert_allclose(measured, lr * np.array(grad_norms), rtol=1e-5)


def test_shape_changes_gaps_and_nan_are_reported_per_tensor(store: Store, rng):
    plan = [  # step: (a, b)
        (0, (np.ones(3), np.ones(2))),
        (1, (np.ones(3) * 2, None)),
        (2, (np.ones(3) * 3, np.array([np.nan, 1.0]))),
        (3, (np.ones(4), np.ones(2) * 5)),
        (4, (np.ones(4) * 2, np.ones(2) * 6)),
    ]
    for step, (a, b) in plan:
        recs = [TensorRecord("a", a)] + ([TensorRecord("b", b)] if b is not None else [])
        store.write(RecordsSource(recs), "m", step=step)
    rows = trajectory(store, "m").to_pylist()
    a = [r["status"] for r in rows if r["tensor"] == "a"]
    b = [r["status"] for r in rows if r["tensor"] == "b"]
    assert a == ["first", "ok", "ok", "shape changed", "ok"]
    assert b == ["first", "missing", "non-finite values", "resumed", "ok"]
    a4 = [r for r in rows if r["tensor"] == "a"][4]
    assert a4["update_norm"] == pytest.approx(2.0)
    assert a4["distance_from_init"] == pytest.approx(2.0)
    b3 = [r for r in rows if r["tensor"] == "b"][3]
    assert b3["update_norm"] is None
    assert b3["distance_from_init"] == pytest.approx(np.linalg.norm([4.0, 4.0]))


def test_needs_two_steps(store: Store):
    store.write(RecordsSource([TensorRecord("w", np.ones(2))]), "m", step=0)
    store.write(RecordsSource([TensorRecord("w", np.ones(2))]), "m", tag="final")
    with pytest.raises(ShapeError, match="needs at least 2 step-numbered snapshots, found 1"):
        trajectory(store, "m")
