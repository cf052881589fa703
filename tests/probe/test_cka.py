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
