"""Feature visualization through the executor: the parametrization against closed forms,
Adam against optax, the transformations against exact pixel moves, the optimum of a model
whose optimum is known, and channel selectivity on a CNN trained on scikit-learn's digits
(activations read back with PyTorch)."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from weightatlas.core.executor import FeatureVisResult, feature_visualization, from_onnx
from weightatlas.core.executor._fv_param import (
    adam_init,
    adam_update,
    color_matrix,
    fourier_image,
    spectrum_scale,
    to_rgb,
)
from weightatlas.core.executor._fv_transforms import Transforms
from weightatlas.errors import NotFoundError, ShapeError, UnsupportedError, WeightAtlasError

# ---- models -----------------------------------------------------------------------------------


def export(module: nn.Module, x: torch.Tensor, dynamic_batch: bool) -> object:
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`",
                                category=FutureWarning)
        program = torch.onnx.export(module, (x,), input_names=["x"], dynamic_shapes=dynamic,
                                    dynamo=True, verbose=False)
    return program.model_proto


class OneConv(nn.Module):
    """One convolution with fixed, known filters (no padding)."""

    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(weight))
            self.conv.bias.fill_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))


@functools.cache
def filters() -> tuple[np.ndarray, object]:
    """Four 5x5 RGB filters with a clear sign pattern, and the single-conv model."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    w[np.abs(w) < 0.05] = 0.3  # no weight so small that its sign is a coin toss
    return w, export(OneConv(w).eval(), torch.zeros(2, 3, 12, 12), dynamic_batch=True)


@functools.cache
def digits_cnn() -> tuple[nn.Module, np.ndarray, object]:
    """A small CNN trained on scikit-learn's digits (8x8, values in [0, 1]), exported with a
    batch of 1."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xt = torch.tensor(x.reshape(-1, 1, 8, 8) / 16, dtype=torch.float32)
    yt = torch.tensor(y)
    torch.manual_seed(0)
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), 2e-2)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    net.eval()
    assert (net(xt).argmax(1) == yt).float().mean() > 0.9
    return net, xt.numpy(), export(net, xt[:1], dynamic_batch=False)


def conv2_means(net: DigitsCNN, images: np.ndarray) -> np.ndarray:
    """PyTorch's conv2 output (before its ReLU), averaged over positions: [images, 12]."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
        return net.conv2(torch.relu(net.conv1(x))).mean(dim=(2, 3)).numpy()


# ---- the parametrization, the optimizer, the transformations ------------------------------


@pytest.mark.parametrize(("h", "w", "ky", "kx"), [(8, 8, 1, 2), (9, 7, 7, 3), (6, 10, 0, 0),
                                                  (12, 12, 3, 0)])
def test_fourier_image_is_the_scaled_inverse_transform(h, w, ky, kx):
    a, b = 0.7, -0.4
    params = np.zeros((h, w // 2 + 1, 2), np.float32)
    params[ky, kx] = (a, b)
    scale = spectrum_scale(h, w)
    image = np.asarray(fourier_image(params, scale, h, w))
    # closed form: one coefficient X[ky, kx] = a + ib of a real image's half spectrum
    fy = (ky if ky <= h // 2 else ky - h) / h
    f = np.hypot(fy, kx / w)
    s = np.sqrt(h * w) / max(f, 1 / max(h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    theta = 2 * np.pi * (ky * yy / h + kx * xx / w)
    # the coefficient and its conjugate mirror both count, except in the kx = 0 column
    # (and the Nyquist column of an even width), which irfft2 takes once
    mirrored = 1 if kx == 0 or (w % 2 == 0 and kx == w // 2) else 2
    want = mirrored * s * (a * np.cos(theta) - b * np.sin(theta)) / (h * w) / 4
    np.testing.assert_allclose(image, want, atol=1e-6)
    # and any spectrum against numpy's inverse transform
    rng = np.random.default_rng(1)
    params = rng.standard_normal((2, h, w // 2 + 1, 2)).astype(np.float32)
    want = np.fft.irfft2((params[..., 0] + 1j * params[..., 1]) * scale, s=(h, w)) / 4
    np.testing.assert_allclose(np.asarray(fourier_image(params, scale, h, w)), want,
                               atol=1e-5)


def test_spectrum_scale_is_one_over_frequency_and_unitary():
    h, w = 16, 16
    scale = spectrum_scale(h, w)
    assert scale.shape == (16, 9)
    assert scale[0, 0] == pytest.approx(16 * 16)        # DC: floored at 1 / max(h, w)
    assert scale[0, 4] == pytest.approx(16 / 0.25)      # f = 4/16 cycles per pixel
    assert scale[3, 4] == pytest.approx(16 / np.hypot(3 / 16, 4 / 16))


def test_decorrelation_is_lucids_and_keeps_images_in_range():
    lucid = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    m = color_matrix(3)
    np.testing.assert_allclose(m, lucid / np.linalg.norm(lucid, axis=0).max(), rtol=1e-6)
    np.testing.assert_array_equal(color_matrix(1), np.eye(1))
    np.testing.assert_array_equal(color_matrix(3, decorrelate=False), np.eye(3))
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((4, 3, 10, 10)).astype(np.float32) * 50
    rgb = np.asarray(to_rgb(raw, m))
    assert rgb.min() >= 0 and rgb.max() <= 1
    want = 1 / (1 + np.exp(-np.einsum("jk,nkhw->njhw", m, raw.astype(np.float64))))
    np.testing.assert_allclose(rgb, want, atol=1e-6)
    assert np.all(np.asarray(to_rgb(np.zeros((1, 3, 2, 2), np.float32), m)) == 0.5)


def test_adam_matches_optax():
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    params = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    opt = optax.adam(0.05, eps=1e-8)
    ref_params, ref_state = params, opt.init(params)
    state = adam_init(params)
    for _ in range(6):
        grads = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
        params, state = adam_update(params, grads, state, 0.05)
        updates, ref_state = opt.update(grads, ref_state)
        ref_params = optax.apply_updates(ref_params, updates)
        np.testing.assert_allclose(np.asarray(params), np.asarray(ref_params), atol=1e-6)


def test_transforms_move_pixels_exactly():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    img = rng.random((3, 9, 9)).astype(np.float32)
    tf = Transforms.of(2, (1.0,), ())
    same = np.asarray(tf.apply(img, jnp.asarray([0, 0, 1, 0, 0, 0], jnp.float32)))
    np.testing.assert_allclose(same, img, atol=1e-6)
    moved = np.asarray(tf.apply(img, jnp.asarray([2, -1, 1, 0, 0, 0], jnp.float32)))
    want = np.full_like(img, 0.5)
    want[:, 2:, :-1] = img[:, :-2, 1:]  # content moves 2 down and 1 left; gray comes in
    np.testing.assert_allclose(moved, want, atol=1e-6)
    turned = np.asarray(tf.apply(img, jnp.asarray([0, 0, 1, np.pi / 2, 0, 0], jnp.float32)))
    np.testing.assert_allclose(turned, np.rot90(img, -1, axes=(1, 2)), atol=1e-5)
    keys = jax.random.split(jax.random.key(0), 200)
    p = np.asarray(jax.vmap(Transforms.of(3, (0.9, 1.1), (-5, 5)).sample)(keys))
    assert set(np.unique(p[:, :2])) == set(range(-3, 4))
    assert set(np.unique(p[:, 4:])) == {-1.0, 0.0, 1.0}
    assert set(np.round(p[:, 2].astype(np.float64), 6).tolist()) == {0.9, 1.1}
    assert set(np.round(np.degrees(p[:, 3].astype(np.float64)), 4).tolist()) == {-5.0, 5.0}


def test_neuron_optimum_of_one_convolution_is_the_filter_sign():
    """Under the box [0, 1], the centre output of one convolution (linear in the patch it
    sees) is largest where the image is 1 at the filter's positive weights and 0 at its
    negative ones."""
    w, model = filters()
    fn = from_onnx(model)
    value = fn.output_of("conv.weight")
    r = feature_visualization(fn, value, [0, 1, 2, 3], objective="neuron", size=12, steps=96,
                              lr=0.1, parametrization="pixel", decorrelate=False, jitter=0,
                              scales=(1,), rotate=())
    assert isinstance(r, FeatureVisResult) and r.images.shape == (4, 3, 12, 12)
    assert r.images.dtype == np.float32 and r.images.min() >= 0 and r.images.max() <= 1
    c = (8 - 1) // 2  # centre of the 8x8 output; it sees input rows and columns 3..7
    # the position expanded weights differentiate, so the two can stand side by side
    from weightatlas.core.executor import expanded_weights
    assert expanded_weights(fn, fn.input_names[0], value, input_shape=(1, 3, 12, 12)
                            ).centre == (c, c)
    for i in range(4):
        patch = r.images[i][:, c : c + 5, c : c + 5]
        assert np.mean((patch > 0.5) == (w[i] > 0)) > 0.95
        optimum = float((np.maximum(w[i], 0)).sum()) + 0.1
        assert r.final[i] == pytest.approx(optimum, rel=0.05)
        cos = np.sum((patch - 0.5) * w[i]) / np.linalg.norm(patch - 0.5) / np.linalg.norm(w[i])
        assert cos > 0.6
    # the objective rose and its last values are those of the final image
    assert (r.objective[-1] > r.objective[0] + 1).all()
    np.testing.assert_allclose(r.objective[-1], r.final, rtol=1e-2)


def test_direction_neuron_optimum_is_the_sign_of_the_combined_filter():
    """Lucid's ``direction_neuron``: the centre activation's dot product with a direction v
    is the convolution with the filter sum_c v_c W_c, whose box optimum is its sign."""
    w, model = filters()
    fn = from_onnx(model)
    v = np.array([[1.0, -0.5, 0.0, 0.25], [0.0, 0.0, 1.0, 1.0]], np.float32)
    r = feature_visualization(fn, fn.output_of("conv.weight"), None, directions=v,
                              objective="neuron", size=12, steps=96, lr=0.1,
                              parametrization="pixel", decorrelate=False, jitter=0,
                              scales=(1,), rotate=())
    assert r.channels == (0, 1)
    for i in range(2):
        combined = np.tensordot(v[i], w, axes=(0, 0))
        patch = r.images[i][:, 3:8, 3:8]  # the 5x5 patch the centre (3, 3) sees
        assert np.mean((patch > 0.5) == (combined > 0)) > 0.95
        optimum = float(np.maximum(combined, 0).sum()) + 0.1 * float(v[i].sum())
        assert r.final[i] == pytest.approx(optimum, rel=0.05)
    with pytest.raises(WeightAtlasError, match=r"directions must be \[n, 4\], got \[2, 3\]"):
        feature_visualization(fn, fn.output_of("conv.weight"), None, directions=v[:, :3],
                              size=12)
    with pytest.raises(UnsupportedError, match="give either channels or directions"):
        feature_visualization(fn, fn.output_of("conv.weight"), [0], directions=v, size=12)


@pytest.fixture(scope="module")
def digits_fv():
    net, x, model = digits_cnn()
    fn = from_onnx(model)
    value = fn.output_of("conv2.weight")
    r = feature_visualization(fn, value, range(12), size=8, steps=64, jitter=1, seed=3)
    return net, x, fn, value, r


def test_visualizations_excite_their_own_channel(digits_fv):
    """Channel c's visualization excites channel c (PyTorch's activations) more than the
    other visualizations do, and more than random images and the digits themselves."""
    net, x, _, _, r = digits_fv
    act = conv2_means(net, r.images)                     # [image, channel]
    own = np.diag(act)
    np.testing.assert_allclose(own, r.final, rtol=1e-4, atol=1e-4)  # executor = PyTorch
    off = ~np.eye(12, dtype=bool)
    assert (own[None, :] > act)[off].mean() > 0.9   # act[o, c] < act[c, c] for most o != c
    noise = conv2_means(net, np.random.default_rng(0).random((256, 1, 8, 8)))
    assert (own > noise.max(axis=0)).all()
    data = conv2_means(net, x)
    assert (own > np.percentile(data, 99, axis=0)).mean() >= 0.9
    assert (r.objective[-8:].mean(axis=0) > r.objective[:8].mean(axis=0)).all()


def test_same_seed_same_images_and_batching_changes_nothing(digits_fv):
    _, _, fn, value, r = digits_fv
    again = feature_visualization(fn, value, range(12), size=8, steps=64, jitter=1, seed=3)
    np.testing.assert_array_equal(again.images, r.images)
    np.testing.assert_array_equal(again.objective, r.objective)
    other = feature_visualization(fn, value, [0, 1], size=8, steps=64, jitter=1, seed=4)
    assert np.abs(other.images - r.images[:2]).max() > 0.05
    split = feature_visualization(fn, value, range(12), size=8, steps=64, jitter=1, seed=3,
                                  batch=5)  # 5 + 5 + 2 (padded to 5)
    assert split.images.shape == (12, 1, 8, 8) and split.objective.shape == (64, 12)
    np.testing.assert_allclose(split.images, r.images, atol=1e-4)
    np.testing.assert_allclose(split.objective, r.objective, rtol=1e-4, atol=1e-4)


def test_normalization_is_applied_after_the_parametrization():
    w, model = filters()
    fn = from_onnx(model)
    value = fn.output_of("conv.weight")
    kw = dict(objective="neuron", size=12, steps=4, parametrization="pixel", jitter=0,
              scales=(1,), rotate=())
    r = feature_visualization(fn, value, [0], normalize=([0.5, 0.4, 0.3], 0.25), **kw)
    x = (r.images[0] - np.array([0.5, 0.4, 0.3])[:, None, None]) / 0.25
    centre = float((x[:, 3:8, 3:8] * w[0]).sum()) + 0.1  # the centre (3, 3) of 8x8
    assert r.final[0] == pytest.approx(centre, rel=1e-4)


def test_bad_input_is_reported_before_optimizing(monkeypatch):
    _, model = filters()
    fn = from_onnx(model)
    value = fn.output_of("conv.weight")
    import weightatlas.core.executor._featurevis as fv

    def refuse(*args, **kwargs):
        raise AssertionError("optimization started")

    monkeypatch.setattr(fv, "_compile", refuse)
    with pytest.raises(NotFoundError, match=r"no value named 'conv_2d'; did you mean 'conv2d'"):
        feature_visualization(fn, "conv_2d", [0], size=12)
    with pytest.raises(WeightAtlasError, match=r"has 4 channels .*channels \[4, -1\] are not "
                                               r"in 0\.\.3"):
        feature_visualization(fn, value, [1, 4, -1], size=12)
    with pytest.raises(ShapeError, match=r"size=\(12, 12, 3\); expected an int or \(height, "
                                         r"width\)"):
        feature_visualization(fn, value, [0], size=(12, 12, 3))
    with pytest.raises(UnsupportedError, match="objective='pixel'; expected one of channel"):
        feature_visualization(fn, value, [0], size=12, objective="pixel")
    with pytest.raises(UnsupportedError, match="parametrization='cppn'"):
        feature_visualization(fn, value, [0], size=12, parametrization="cppn")
    with pytest.raises(UnsupportedError, match="normalize="):
        feature_visualization(fn, value, [0], size=12, normalize=([0.5, 0.5], 1.0))
    _, _, digits = digits_cnn()
    dfn = from_onnx(digits)
    flat = next(v for v in dfn.value_names() if v.startswith("view"))
    with pytest.raises(ShapeError, match=rf"objective='neuron' .* value '{flat}' has shape "
                                         r"\[1, 192\]"):
        feature_visualization(dfn, flat, [0], objective="neuron")
    with pytest.raises(WeightAtlasError, match=r"size=16 does not fit"):
        feature_visualization(dfn, flat, [0], size=16)


@pytest.mark.parametrize("convention", ["torch", "onnx"])
def test_feature_visualization_of_a_stored_model(digits_fv, tmp_path, store, convention):
    """``wa.feature_visualization`` on a snapshot, named by its stored layer, gives the
    images the executor gives on the exported model (both PyTorch adapter's graph and
    an ingested ONNX file)."""
    import onnx

    import weightatlas as wa
    from weightatlas.adapters import torch as torch_adapter

    net, x, _, _, direct = digits_fv
    if convention == "torch":
        store.write(torch_adapter.from_module(net, example_inputs=(torch.from_numpy(x[:1]),)),
                    "digits", step=20)
    else:
        _, _, model = digits_cnn()
        onnx.save(model, tmp_path / "digits.onnx")
        wa.ingest(tmp_path / "digits.onnx", store=store, model="digits", step=20)
    r = wa.feature_visualization("digits@20", "conv2", range(12), store=store, size=8,
                                 steps=64, jitter=1, seed=3)
    np.testing.assert_allclose(r.images, direct.images, atol=2e-3)
    np.testing.assert_allclose(np.diag(conv2_means(net, r.images)), r.final, rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(NotFoundError, match=r"no layer, stored tensor or graph value named "
                                            r"'conv3'; close names: 'conv2'"):
        wa.feature_visualization("digits@20", "conv3", [0], store=store, size=8)
