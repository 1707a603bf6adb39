"""Spectral analysis against closed forms, NumPy's SVD and WeightWatcher."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest

from weightatlas.core._powerlaw import fit_power_law
from weightatlas.core.spectrum import (
    eigenvalues,
    marchenko_pastur_density,
    matrix_spectrum,
    spectrum,
    weight_matrices,
)
from weightatlas.errors import NotFoundError, ShapeError
from weightatlas.storage import RecordsSource, Store, TensorRecord


def with_singular_values(s: np.ndarray, rows: int, rng) -> np.ndarray:
    u, _ = np.linalg.qr(rng.standard_normal((rows, s.size)))
    v, _ = np.linalg.qr(rng.standard_normal((s.size, s.size)))
    return (u * s) @ v.T


@pytest.mark.parametrize("shape", [(200, 50), (50, 200), (64, 64)], ids=str)
def test_constructed_singular_values(rng, shape):
    k = min(shape)
    s = np.sort(rng.uniform(0.1, 5.0, k))[::-1]
    w = with_singular_values(s, max(shape), rng)
    w = w if shape[0] >= shape[1] else w.T
    w = w[: shape[0], : shape[1]] if w.shape != shape else w
    evals = eigenvalues(w)
    np.testing.assert_allclose(evals, np.sort(s**2), rtol=1e-10)
    np.testing.assert_allclose(evals, np.sort(np.linalg.svd(w, compute_uv=False) ** 2),
                               rtol=1e-9)
    spec = matrix_spectrum([w])
    assert spec.spectral_norm == pytest.approx(s.max(), rel=1e-12)
    assert spec.stable_rank == pytest.approx((s**2).sum() / s.max() ** 2, rel=1e-10)
    p = s / s.sum()
    assert spec.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-10)


def test_float32_weights_use_a_float32_gram_within_documented_error(rng):
    s = np.geomspace(0.01, 50, 200)
    w = with_singular_values(s, 600, rng)
    fast = eigenvalues(w.astype(np.float32))
    exact = eigenvalues(w.astype(np.float32), exact=True)
    assert np.abs(fast - exact).max() < 1e-6 * exact.max()
    # This tail reaches down to 1e-7 * lambda_max, where float32 error shows (alpha moves by
    # ~5e-3), so matrix_spectrum refits it exactly.
    reference = fit_power_law(eigenvalues(w.astype(np.float32).astype(np.float64)))
    assert reference.xmin < 1e-3 * exact.max()
    assert matrix_spectrum([w.astype(np.float32)]).fit.alpha == pytest.approx(
        reference.alpha, rel=1e-9)
    # A typical tail (above 1e-3 * lambda_max) keeps the fast eigenvalues.
    s2 = np.geomspace(5, 50, 200)
    w2 = with_singular_values(s2, 600, rng).astype(np.float32)
    fast2 = matrix_spectrum([w2])
    assert fast2.fit.xmin >= 1e-3 * fast2.evals[-1]
    assert fast2.fit.alpha == pytest.approx(
        fit_power_law(eigenvalues(w2, exact=True)).alpha, abs=1e-6)


def test_power_law_recovers_known_exponents(rng):
    for alpha in (1.8, 2.5, 4.0):
        x = (1 - rng.random(15_000)) ** (-1 / (alpha - 1))
        fit = fit_power_law(x)
        assert fit.alpha == pytest.approx(alpha, abs=0.06)
        assert fit.ks_distance < 0.03 and fit.n_tail > 500


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("n", [9, 15, 19, 20, 60, 700, 3000])
def test_power_law_fit_is_weightwatchers(rng, n):
    wwp = pytest.importorskip("weightwatcher.WW_powerlaw")
    for trial in range(8):
        x = (1 - rng.random(n)) ** (-1 / (0.6 + trial % 4)) * rng.uniform(0.1, 20)
        ours = fit_power_law(x)
        with contextlib.redirect_stdout(io.StringIO()):
            theirs = wwp.WWFit(x[x > 1e-5])
        assert ours.alpha == pytest.approx(theirs.alpha, rel=1e-9)
        assert ours.xmin == pytest.approx(theirs.xmin, rel=1e-12)
        assert ours.ks_distance == pytest.approx(theirs.D, rel=1e-9)


def test_marchenko_pastur_bulk_and_spikes(rng):
    n, m = 2000, 400
    x = np.linspace(0.1, 5000, 400_000)
    assert np.trapezoid(marchenko_pastur_density(x, n, m, 1.0), x) == pytest.approx(1, abs=2e-3)
    noise = rng.standard_normal((n, m))
    spec = matrix_spectrum([noise])
    assert spec.mp_lambda_plus == pytest.approx((math.sqrt(n) + math.sqrt(m)) ** 2, rel=0.01)
    assert spec.n_spikes <= 2
    signal = noise + 0.5 * np.outer(rng.standard_normal(n), rng.standard_normal(m))
    assert matrix_spectrum([signal]).n_spikes >= 1


def test_conv_weights_flatten_or_per_position(rng):
    w = rng.standard_normal((16, 8, 3, 3))
    (flat,) = weight_matrices(w, "conv2d")
    assert flat.shape == (16, 72)
    per = weight_matrices(w, "conv2d", conv="per_position")
    assert len(per) == 9 and per[4].shape == (16, 8)
    np.testing.assert_array_equal(per[4], w[:, :, 1, 1])
    with pytest.raises(ShapeError, match=r"tensor 'b': a matrix analysis needs at least 2 "):
        weight_matrices(np.ones(4), "linear", name="b")


def test_spectrum_table_of_a_snapshot(store: Store, rng):
    good = rng.standard_normal((120, 60)).astype(np.float32)
    bad = good.copy()
    bad[0, 0] = np.nan
    recs = [
        TensorRecord("fc1.weight", good, kind="linear", layout=("out", "in")),
        TensorRecord("fc1.bias", np.zeros(120, np.float32), kind="linear", layout=("out",)),
        TensorRecord("fc2.weight", bad, kind="linear", layout=("out", "in")),
        TensorRecord("conv.weight", rng.standard_normal((32, 4, 3, 3)).astype(np.float32),
                     kind="conv2d", layout=("out", "in", "h", "w")),
        TensorRecord("emb.weight", rng.standard_normal((5000, 64)).astype(np.float32),
                     kind="embedding", layout=("vocab", "dim")),
    ]
    snap = store.write(RecordsSource(recs), "m")
    rows = {r["name"]: r for r in spectrum(snap).to_pylist()}
    assert sorted(rows) == ["conv.weight", "emb.weight", "fc1.weight", "fc2.weight"]
    assert rows["fc2.weight"]["status"] == "non-finite values"
    assert rows["fc2.weight"]["alpha"] is None
    fc1 = rows["fc1.weight"]
    sv = np.linalg.svd(good.astype(np.float64), compute_uv=False)
    assert fc1["n_evals"] == 60 and fc1["status"] == "ok"
    assert fc1["spectral_norm"] == pytest.approx(sv.max(), rel=1e-6)  # float32 Gram
    assert fc1["alpha"] == pytest.approx(fit_power_law(sv**2).alpha, abs=1e-6)
    assert (rows["conv.weight"]["rows"], rows["conv.weight"]["cols"]) == (32, 36)
    assert rows["emb.weight"]["n_evals"] == 64
    per = spectrum(snap, ["conv.weight"], conv="per_position").to_pylist()[0]
    assert (per["matrix"], per["rows"], per["cols"], per["n_evals"]) == (
        "per_position", 32, 4, 36)
    with pytest.raises(ShapeError, match=r"fc1\.bias"):
        spectrum(snap, ["fc1.bias"])
    with pytest.raises(NotFoundError, match=r"no tensor 'fc3\.weight'"):
        spectrum(snap, ["fc3.weight"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_alpha_matches_weightwatcher_analyze_on_a_trained_model(tmp_path):
    torch = pytest.importorskip("torch")
    ww = pytest.importorskip("weightwatcher")
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    import weightatlas as wa

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(64 * 64, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )
    x, y = load_digits(return_X_y=True)
    xt, yt = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    path = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    snap = wa.ingest(path, store=tmp_path / "store")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        details = ww.WeightWatcher(model=model).analyze(plot=False, randomize=False)
    theirs = dict(zip(details["name"], details["alpha"], strict=True))
    ours = {r["name"]: r for r in spectrum(snap, conv="per_position").to_pylist()}
    assert sorted(theirs) == ["1", "10", "3", "6", "8"]  # WeightWatcher's layer names
    for index, alpha in theirs.items():
        assert ours[f"{index}.weight"]["alpha"] == pytest.approx(alpha, abs=0.05), index
