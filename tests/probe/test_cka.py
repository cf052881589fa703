"""Linear CKA and its minibatch unbiased estimator: identity, invariances, the direct formula, large-N agreement."""

import numpy as np
import pytest
import torch

from probe.errors import ProbeError
from probe.cka import MinibatchCKA, cka_matrix, hsic_unbiased, linear_cka

torch.set_num_threads(1)
RNG = np.random.default_rng(0)


def _direct(x, y):
    """The textbook formula with explicit centring matrix H: HSIC = tr(K H L H)."""
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("n, shape_x, shape_y", [(20, (3, 4, 4), (5, 2, 2)), (200, (6,), (4,))])  # Gram / covariance forms
def test_identity_direct_formula_and_invariances(n, shape_x, shape_y):
    x = RNG.normal(size=(n, *shape_x))
    y = np.tanh(x.reshape(n, -1)[:, : int(np.prod(shape_y))].reshape(n, *shape_y)) + 0.5 * RNG.normal(size=(n, *shape_y))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    value = linear_cka(x, y)
    assert value == pytest.approx(_direct(x, y), rel=1e-10)
    assert 0.0 < value < 1.0
    flat = x.reshape(n, -1)
    q, _ = np.linalg.qr(RNG.normal(size=(flat.shape[1], flat.shape[1])))
    assert linear_cka(flat @ q, y) == pytest.approx(value, rel=1e-10)  # orthogonal transform
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(value, rel=1e-10)  # isotropic scaling
    assert linear_cka(x + 3.0, y) == pytest.approx(value, rel=1e-10)  # mean shift (centred)


def test_unbiased_hsic_matches_explicit_sum():
    x, y = RNG.normal(size=(9, 3)), RNG.normal(size=(9, 2))
    k, l = torch.tensor(x @ x.T), torch.tensor(y @ y.T)
    n = 9
    kt, lt = k.clone().fill_diagonal_(0).numpy(), l.clone().fill_diagonal_(0).numpy()
    one = np.ones(n)
    expected = (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))
    assert hsic_unbiased(k, l).item() == pytest.approx(expected, rel=1e-10)


def test_minibatch_estimator_close_to_full_batch_on_large_n():
    n = 6000
    x = RNG.normal(size=(n, 8))
    y = x @ RNG.normal(size=(8, 5)) + RNG.normal(size=(n, 5))
    z = RNG.normal(size=(n, 6))
    full = cka_matrix([x, y, z], estimator="linear")
    mini = cka_matrix([x, y, z], estimator="minibatch", batch_size=500)
    np.testing.assert_allclose(np.diag(mini), 1.0)
    np.testing.assert_allclose(mini, full, atol=0.02)
    assert mini[0, 1] > 0.5 and abs(mini[0, 2]) < 0.02
    # Streamed minibatches (here consecutive rows of i.i.d. data) estimate the same matrix as arrays in memory.
    acc = MinibatchCKA(3)
    for s in range(0, n, 500):
        acc.update([x[s:s + 500], y[s:s + 500], z[s:s + 500]])
    np.testing.assert_allclose(acc.compute(), mini, atol=0.02)


def test_errors():
    with pytest.raises(ProbeError, match="same images"):
        linear_cka(np.zeros((4, 2)), np.zeros((5, 2)))
    with pytest.raises(ProbeError, match="constant"):
        linear_cka(np.ones((4, 2)), RNG.normal(size=(4, 2)))
    with pytest.raises(ProbeError, match="estimator"):
        cka_matrix([np.zeros((4, 2))], estimator="rbf")


def _numpy_linear_cka(x, y):
    """Direct float64 numpy linear CKA: centred Gram matrices, Frobenius inner products."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    k = (x - x.mean(0)) @ (x - x.mean(0)).T
    l = (y - y.mean(0)) @ (y - y.mean(0)).T
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


def _numpy_hsic(x, y):
    """Unbiased HSIC (Song et al. 2012) of two minibatches, float64 numpy, explicit ones vectors."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    n = len(x)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_float16_input_in_float32_with_float64_sums_matches_float64_numpy(device):
    """Features with a large common offset (as real activations have) lose nothing to float32 products."""
    n = 300
    base = RNG.normal(size=(n, 64))
    x = (40.0 + base @ RNG.normal(size=(64, 512))).astype(np.float16)  # Gram form (n^2 < p q)
    y = (np.tanh(base[:, :32]) @ RNG.normal(size=(32, 48)) - 25.0).astype(np.float16)
    z = (base[:, :8] + 0.3 * RNG.normal(size=(n, 8)) + 100.0).astype(np.float16)  # covariance form with y
    for a, b in ((x, y), (y, z), (x, z)):
        got = linear_cka(torch.from_numpy(a), torch.from_numpy(b), device=device)
        assert got == pytest.approx(_numpy_linear_cka(a, b), rel=1e-5)
    batches = [[torch.from_numpy(a[s:s + 50]) for a in (x, y, z)] for s in range(0, n, 50)]
    got = cka_matrix(batches=batches, device=device)
    hsic = np.array([[sum(_numpy_hsic(a[s:s + 50], b[s:s + 50]) for s in range(0, n, 50)) for b in (x, y, z)]
                     for a in (x, y, z)])
    np.testing.assert_allclose(got, hsic / np.sqrt(np.outer(np.diag(hsic), np.diag(hsic))), rtol=1e-5, atol=1e-7)


def test_minibatches_of_class_sorted_rows_are_drawn_across_classes():
    """Two arrays that agree on the class and have independent noise inside a class: one-class minibatches
    (consecutive rows of a class-sorted split) would measure the noise only and give a CKA near 0."""
    classes, per_class = 20, 100
    labels = np.repeat(np.arange(classes), per_class)
    centers = RNG.normal(size=(classes, 16))
    x = centers[labels] + 0.5 * RNG.normal(size=(len(labels), 16))
    y = (centers @ RNG.normal(size=(16, 12)))[labels] + 0.5 * RNG.normal(size=(len(labels), 12))
    x, y = torch.from_numpy(x).half(), torch.from_numpy(y).half()
    full = _numpy_linear_cka(x.numpy(), y.numpy())
    mini = cka_matrix([x, y], batch_size=100, seed=3)
    assert mini[0, 1] == pytest.approx(full, abs=0.05) and full > 0.5
    assert not np.array_equal(mini, cka_matrix([x, y], batch_size=100, seed=4))
    one_class = MinibatchCKA(2)
    for s in range(0, len(labels), 100):
        one_class.update([x[s:s + 100], y[s:s + 100]])
    assert one_class.compute()[0, 1] < 0.2  # what consecutive minibatches would have reported


@pytest.mark.e2e
@pytest.mark.parametrize("device", DEVICES)
def test_cka_of_real_cifar10_features_matches_float64_numpy(cifar10_root, device):
    """Blocks 4, 8 and 12 of 32x32_small (random weights) on 256 real CIFAR-10 images, stored as float16."""
    from extract.backbone.registry import create_backbone
    from extract.inputs.images import load_batch
    from extract.noise import seeded_noise
    from extract.schedule import get_schedule
    from pipeline.datasets import build_index

    index = build_index("cifar10", "test", root=cifar10_root.parent, limit=256)
    images, ok, _ = load_batch(index.paths, 32)
    assert ok.all()
    t = torch.full((len(images),), 50)
    x_t = get_schedule("linear").q_sample(images, t, seeded_noise(0, range(len(images)), 50, (3, 32, 32)))
    with torch.no_grad():
        maps = create_backbone("32x32_small", weight_seed=0).features(x_t, t, [4, 8, 12])
    arrays = [maps[b].half() for b in (4, 8, 12)]  # as the cache stores them
    pooled = [torch.nn.functional.adaptive_avg_pool2d(a.float(), 1).half() for a in arrays]  # covariance form
    for group in (arrays, pooled):
        got = cka_matrix(group, estimator="linear", device=device)
        for i in range(3):
            for j in range(i + 1, 3):
                assert got[i, j] == pytest.approx(_numpy_linear_cka(group[i].numpy(), group[j].numpy()), rel=1e-5)
