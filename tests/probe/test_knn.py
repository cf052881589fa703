"""Chunked weighted kNN equals a brute-force reference for any chunk sizes and test-set sizes."""

import math

import pytest
import torch

from probe.errors import ProbeError
from probe.knn import knn_classify, knn_votes

torch.set_num_threads(1)


def _reference_votes(train, train_labels, test, num_classes, k, temperature=0.07):
    """Brute force: full cosine matrix, full sort, explicit loops over neighbours."""
    a = train.flatten(1).double()
    b = test.flatten(1).double()
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    sim = b @ a.T
    votes = torch.zeros(b.shape[0], num_classes, dtype=torch.float64)
    for i in range(b.shape[0]):
        order = sim[i].argsort(descending=True)[: min(k, a.shape[0])]
        for j in order.tolist():
            votes[i, train_labels[j]] += math.exp(sim[i, j].item() / temperature)
    return votes


def _data(n_train, n_test, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_train, 3, 2, 2, generator=g), torch.randint(0, classes, (n_train,), generator=g),
            torch.randn(n_test, 3, 2, 2, generator=g), torch.randint(0, classes, (n_test,), generator=g))


@pytest.mark.parametrize("n_test, train_chunk, test_chunk", [(1, 7, 1), (13, 23, 5), (37, 1000, 1000), (29, 11, 4)])
def test_votes_match_brute_force(n_test, train_chunk, test_chunk):
    train, labels, test, _ = _data(101, n_test)
    ks = (1, 10, 20, 100, 200)
    votes = knn_votes(train, labels, test, 7, ks=ks, train_chunk=train_chunk, test_chunk=test_chunk)
    for k in ks:
        ref = _reference_votes(train, labels, test, 7, k)
        # Relative: votes are exp(cos / 0.07), up to e^14.
        torch.testing.assert_close(votes[k].double(), ref, rtol=1e-4, atol=1e-6)


def test_accuracy_matches_brute_force_and_streamed_chunks_equal_tensor():
    train, labels, test, test_labels = _data(300, 77, classes=10, seed=1)
    scores = knn_classify(train, labels, test, test_labels, 10, train_chunk=64, test_chunk=10)
    streamed = knn_classify(((train[s:s + 50], labels[s:s + 50]) for s in range(0, 300, 50)), None,
                            test, test_labels, 10, test_chunk=33)
    for k in (10, 20, 100, 200):
        ref = _reference_votes(train, labels, test, 10, k)
        top = ref.topk(5, dim=1).indices
        assert scores[k]["top1"] == pytest.approx((top[:, 0] == test_labels).double().mean().item())
        top5 = (top == test_labels[:, None]).any(dim=1).double().mean().item()
        assert scores[k]["top5"] == pytest.approx(top5) and top5 < 1.0
        assert scores[k] == streamed[k]


def test_separable_classes_are_recognised():
    train = torch.eye(4).repeat(25, 1) + 0.01 * torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4).repeat(25)
    scores = knn_classify(train, labels, torch.eye(4), torch.arange(4), 4, ks=(10,))
    assert scores[10]["top1"] == 1.0


def test_errors_are_one_line():
    train, labels, test, test_labels = _data(10, 3)
    with pytest.raises(ProbeError, match="values"):
        knn_votes(train, labels, test[:, :1], 7)
    with pytest.raises(ProbeError, match="labels must lie"):
        knn_votes(train, labels, test, 2)


def test_float16_splits_standardised_chunk_by_chunk_match_the_reference_on_standardised_float64():
    """The splits stay float16 (as cached); the transform runs per chunk, equal to standardising them whole first."""
    from probe.logistic import Standardizer

    train, labels, test, _ = _data(150, 31, seed=2)
    train = (3.0 + 2.0 * train * torch.linspace(0.1, 2, 12).reshape(3, 2, 2)).half()  # offsets and scales to remove
    test = (3.0 + 2.0 * test * torch.linspace(0.1, 2, 12).reshape(3, 2, 2)).half()
    scale = Standardizer.fit(train.flatten(1))
    votes = knn_votes(train, labels, test, 7, ks=(5, 20), train_chunk=40, test_chunk=8, transform=scale)
    whole = lambda x: (x.flatten(1).double() - scale.mean.double()) / scale.std.double()  # noqa: E731
    for k in (5, 20):
        ref = _reference_votes(whole(train), labels, whole(test), 7, k)
        torch.testing.assert_close(votes[k].double(), ref, rtol=1e-3, atol=1e-6)
    plain = knn_votes(train, labels, test, 7, ks=(5,))[5]
    assert not torch.allclose(plain, votes[5])  # the transform changed the neighbours
