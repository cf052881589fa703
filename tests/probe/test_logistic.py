"""The converged linear probe reaches the optimum of its objective, checked against independent solutions."""

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from probe.errors import ProbeError
from probe.logistic import Standardizer, converged_linear_probe, fit_logistic, heldout_split, logistic_loss


def _bisect(f, lo, hi, steps=200):
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def test_two_point_problem_reaches_its_closed_form_optimum():
    """x = +1 (class 1) and x = -1 (class 0): by symmetry W = [[-w], [w]], b = 0, and w solves
    d/dw [log(1 + exp(-2w)) + l2 * w^2] = 0 (found here by bisection, independently of torch)."""
    l2 = 0.05
    x = torch.tensor([[1.0], [-1.0]])
    y = torch.tensor([1, 0])
    w_star = _bisect(lambda w: -2 / (1 + math.exp(2 * w)) + 2 * l2 * w, 0.0, 50.0)
    loss_star = math.log1p(math.exp(-2 * w_star)) + l2 * w_star**2
    identity = Standardizer(torch.zeros(1), torch.ones(1))
    model = fit_logistic(x, y, 2, l2, standardizer=identity, tolerance=1e-10)
    assert model.weight[1, 0].item() == pytest.approx(w_star, abs=1e-4)
    assert model.weight[0, 0].item() == pytest.approx(-w_star, abs=1e-4)
    assert model.bias.abs().max().item() < 1e-4
    assert model.loss == pytest.approx(loss_star, abs=1e-7)


def _numpy_objective(params, x, y, classes, l2):
    """The same objective in float64 numpy, with its gradient: an independent implementation."""
    d = x.shape[1]
    w = params[: classes * d].reshape(classes, d)
    b = params[classes * d:]
    logits = x @ w.T + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    n = x.shape[0]
    loss = -np.log(p[np.arange(n), y]).mean() + 0.5 * l2 * (w * w).sum()
    p[np.arange(n), y] -= 1
    grad_w = p.T @ x / n + l2 * w
    grad_b = p.sum(axis=0) / n
    return loss, np.concatenate([grad_w.ravel(), grad_b])


def test_separable_problem_matches_scipy_in_float64():
    rng = np.random.default_rng(0)
    classes, d, n = 4, 12, 400
    centers = rng.normal(size=(classes, d)) * 3
    y = np.repeat(np.arange(classes), n // classes)  # sorted by class, as dataset indexes are
    x = centers[y] + rng.normal(size=(n, d))
    l2 = 1e-3
    scale = Standardizer.fit(torch.from_numpy(x).float())
    xs = scale(torch.from_numpy(x).float()).double().numpy()
    reference = scipy.optimize.minimize(_numpy_objective, np.zeros(classes * d + classes), args=(xs, y, classes, l2),
                                        jac=True, method="L-BFGS-B", options={"maxiter": 20000, "gtol": 1e-12,
                                                                              "ftol": 1e-15})
    model = fit_logistic(torch.from_numpy(x).float(), torch.from_numpy(y), classes, l2, tolerance=1e-9)
    assert model.loss == pytest.approx(reference.fun, abs=1e-6)
    ours = np.concatenate([model.weight.double().numpy().ravel(), model.bias.double().numpy()])
    _, gradient = _numpy_objective(ours, xs, y, classes, l2)
    assert np.abs(gradient).max() < 1e-4  # the optimality condition, checked in float64 outside torch
    logits = model.logits(torch.from_numpy(x).float())
    assert (logits.argmax(1).numpy() == y).all()  # separable: every training row right


def test_chunked_loss_and_gradient_equal_one_pass():
    torch.manual_seed(0)
    x, y = torch.randn(97, 6), torch.randint(0, 3, (97,))
    w = torch.randn(3, 6, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    whole = logistic_loss(w, b, x, y, 0.1, chunk_rows=1000, backward=True)
    grads = (w.grad.clone(), b.grad.clone())
    w.grad = b.grad = None
    chunked = logistic_loss(w, b, x, y, 0.1, chunk_rows=10, backward=True)
    assert chunked == pytest.approx(whole, rel=1e-6)
    torch.testing.assert_close(w.grad, grads[0])
    torch.testing.assert_close(b.grad, grads[1])


def test_heldout_split_is_class_balanced_seeded_and_disjoint():
    labels = np.repeat(np.arange(100), 50)  # class-sorted, as every dataset index is
    fit_rows, held = heldout_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(fit_rows, held)) == 0 and len(fit_rows) + len(held) == len(labels)
    assert (np.bincount(labels[held], minlength=100) == 10).all()
    again = heldout_split(labels, 0.2, seed=3)[1]
    other = heldout_split(labels, 0.2, seed=4)[1]
    assert (again == held).all() and not (other == held).all()
    assert (np.diff(held) > 0).all()  # sorted rows: slices of the cache stay cheap
    tiny = heldout_split(np.array([0, 0, 1, 1, 2]), 0.2, seed=0)
    assert sorted(np.array([0, 0, 1, 1, 2])[tiny[1]]) == [0, 1]  # a class of one image keeps its row


def test_probe_chooses_l2_on_heldout_rows_and_refits():
    rng = np.random.default_rng(1)
    classes, d = 5, 40
    centers = rng.normal(size=(classes, d))
    y = np.repeat(np.arange(classes), 60)
    x = torch.from_numpy(centers[y] + 1.5 * rng.normal(size=(len(y), d))).float()
    yt = np.repeat(np.arange(classes), 40)
    xt = torch.from_numpy(centers[yt] + 1.5 * rng.normal(size=(len(yt), d))).float()
    result = converged_linear_probe(x, torch.from_numpy(y), xt, torch.from_numpy(yt), classes,
                                    l2_grid=(1e-4, 1e-2, 1.0), heldout_fraction=0.2, seed=0)
    assert set(result.heldout_top1) == {1e-4, 1e-2, 1.0} and result.heldout_size == 60
    assert result.l2 == max(result.heldout_top1, key=lambda v: (result.heldout_top1[v], v))
    refit = fit_logistic(x, torch.from_numpy(y), classes, result.l2)  # refit on all train rows
    assert result.train_loss == pytest.approx(refit.loss, abs=1e-6)
    assert result.top1 > 0.8
    with pytest.raises(ProbeError, match="too small to hold out"):
        converged_linear_probe(x[:1], torch.zeros(1, dtype=torch.long), xt, torch.from_numpy(yt), classes)


@pytest.mark.e2e
def test_cifar10_features_reach_the_optimum_of_a_much_longer_run(cifar10_root):
    """Block 8 features of 32x32_small (random weights) on 600 real CIFAR-10 images, computed directly."""
    from extract.backbone.registry import create_backbone
    from extract.inputs.images import load_batch
    from extract.noise import seeded_noise
    from extract.schedule import get_schedule
    from pipeline.datasets import build_index

    index = build_index("cifar10", "train", root=cifar10_root.parent, per_class=60)
    images, ok, _ = load_batch(index.paths, 32)
    assert ok.all()
    t = torch.full((len(images),), 25)
    x_t = get_schedule("linear").q_sample(images, t, seeded_noise(0, range(len(images)), 25, (3, 32, 32)))
    model = create_backbone("32x32_small", weight_seed=0)
    with torch.no_grad():
        features = torch.nn.functional.adaptive_avg_pool2d(model.features(x_t, t, [8])[8], 2).flatten(1)
    labels = torch.from_numpy(index.labels)
    default = fit_logistic(features, labels, 10, 1e-3)
    longer = fit_logistic(features, labels, 10, 1e-3, max_iter=20000, tolerance=1e-12)
    assert default.loss - longer.loss < 1e-4
    assert default.loss >= longer.loss - 1e-7
