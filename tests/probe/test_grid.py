"""A learning-rate grid trained in one pass equals separate runs, bit for bit on the CPU."""

from dataclasses import replace

import pytest
import torch

from probe.grid import HeadGrid
from probe.heads import create_head
from probe.train import TrainConfig, fit

torch.set_num_threads(1)


def _data(n, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4  # class-cyclic; batch order is shuffled by fit anyway
    x = torch.randn(n, 6, 4, 4, generator=generator)
    x[torch.arange(n), labels] += 1.0
    return {(9, 50): x}, labels


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_grid_heads_equal_separate_runs_bit_for_bit(optimizer):
    train_x, train_y = _data(90, 0)
    test_x, test_y = _data(40, 1)
    lrs = (1e-3, 1e-2, 1e-1)
    shapes = {(9, 50): (6, 4, 4)}

    def build():
        return create_head("linear", shapes, 4, pool=2)

    grid = HeadGrid(build, lrs, seed=5)
    config = TrainConfig(epochs=3, step_size=2, optimizer=optimizer, batch_size=16, seed=5)  # lr: the grid's own
    result = fit(grid, train_x, train_y, test_x, test_y, config, heldout_features=test_x, heldout_labels=test_y,
                 progress=False)
    for key, lr in grid.lrs.items():
        torch.manual_seed(5)
        alone = build()
        fit(alone, train_x, train_y, test_x, test_y, replace(config, lr=lr), progress=False)
        for name, value in alone.state_dict().items():
            assert torch.equal(value, grid.heads[key].state_dict()[name]), (lr, name)
    assert set(result.heldout_top1) == set(lrs)
    assert result.lr == max(lrs, key=lambda lr: (result.heldout_top1[lr], -lrs.index(lr)))
