"""Training on several stored views: one seeded view per row and epoch, every view used, scoring on view 0."""

import torch

from probe.train import TrainConfig, _epoch_batches, fit
from probe.views import ViewStack, take_rows, view_choice


def _stack(num_views=4, rows=500):
    """Feature value = view number, so a batch shows which view each row was read in; row id in channel 1."""
    ids = torch.arange(rows, dtype=torch.float16)
    views = [torch.stack([torch.full((rows,), float(v), dtype=torch.float16), ids], dim=1)[:, :, None, None]
             for v in range(num_views)]
    return ViewStack({(4, 90): torch.stack(views)}), torch.arange(rows) % 10


def test_each_epoch_reads_one_seeded_view_per_row_and_scoring_reads_view_0():
    features, labels = _stack()
    seen = {}
    for epoch in (0, 1):
        batches, _ = _epoch_batches(features, labels, 64, 7, epoch, torch.device("cpu"))
        got = torch.cat([b[(4, 90)] for b, _ in batches])
        rows = got[:, 1, 0, 0].long()
        assert sorted(rows.tolist()) == list(range(500))  # every row once
        seen[epoch] = got[:, 0, 0, 0].long()[rows.argsort()]
        assert torch.equal(seen[epoch], view_choice(500, 4, 7, epoch))  # the seeded choice, independent of the order
        assert set(seen[epoch].tolist()) == {0, 1, 2, 3}
    assert (seen[0] != seen[1]).float().mean() > 0.5  # a new draw each epoch
    batches, _ = _epoch_batches(features, labels, 64, None, 0, torch.device("cpu"))
    assert all(bool((b[(4, 90)][:, 0] == 0).all()) for b, _ in batches)


def test_view_choice_repeats_for_a_resume():
    assert torch.equal(view_choice(1000, 8, 3, 5), view_choice(1000, 8, 3, 5))
    assert not torch.equal(view_choice(1000, 8, 3, 5), view_choice(1000, 8, 4, 5))


def test_take_rows_keeps_the_views():
    features, _ = _stack(num_views=3, rows=20)
    part = take_rows(features, torch.tensor([2, 5]))
    assert isinstance(part, ViewStack) and part[(4, 90)].shape == (3, 2, 2, 1, 1)
    assert part[(4, 90)][:, :, 1].flatten().tolist() == [2, 5, 2, 5, 2, 5]


def test_a_head_learns_from_a_view_stack_and_is_scored_on_view_0():
    """Labels one-hot in every view; view 1 adds noise. Trained across both views, the head scores view 0."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 10
    clean = torch.nn.functional.one_hot(labels, 10).float()
    noisy = clean + 0.3 * torch.randn(clean.shape, generator=generator)
    features = ViewStack({(4, 90): torch.stack([clean, noisy])[..., None, None].half()})
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 10))

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = head

        def forward(self, x):
            return self.net(x[(4, 90)])

    test = {(4, 90): features[(4, 90)][0]}
    result = fit(Head(), features, labels, test, labels, TrainConfig(epochs=5, batch_size=25, optimizer="adam", lr=5e-2),
                 progress=False)
    assert len(result.history) == 5 and result.top1 == 1.0
