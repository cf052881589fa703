"""The training protocol: its defaults, learning, and kill-and-resume equal to straight-through bit for bit."""

import inspect

import pytest
import torch

import probe.train as train_module
from probe.errors import ProbeError
from probe.heads import create_head
from probe.train import TrainConfig, evaluate, fit, tensor_batches

torch.set_num_threads(1)

KEY = (24, 150)


def _data(n, seed, classes=4):
    """Separable toy features: class means on a few channels plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = torch.randn(n, 6, 4, 4, generator=g)
    x[torch.arange(n), labels] += 3.0
    return {KEY: x}, labels


def _head(name="linear", seed=0):
    torch.manual_seed(seed)
    extra = dict(dim=16, num_heads=2, depth=1) if name == "attention" else {}
    return create_head(name, {KEY: (6, 4, 4)}, 4, **extra)


def test_protocol_defaults():
    config = TrainConfig()
    assert (config.epochs, config.step_size, config.gamma, config.optimizer) == (28, 7, 0.1, "sgd")
    assert inspect.signature(fit).parameters["config"].default == config  # fit trains by the protocol unless told
    with pytest.raises(ProbeError, match="invalid optimizer 'rmsprop': only sgd, adam"):
        TrainConfig(optimizer="rmsprop")


def test_sgd_has_no_momentum_and_lr_steps_every_seven_epochs(tmp_path):
    train, labels = _data(40, 0)
    result = fit(_head(), train, labels, train, labels, TrainConfig(epochs=15, lr=0.1, batch_size=16), progress=False,
                 checkpoint_dir=tmp_path)
    assert [round(h["lr"], 6) for h in result.history] == [0.1] * 7 + [0.01] * 7 + [0.001]
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0 and group["weight_decay"] == 0
    assert set(state) >= {"head", "optimizer", "scheduler", "epoch", "config", "rng"}


@pytest.mark.parametrize("head_name, optimizer", [("linear", "sgd"), ("attention", "adam")])
def test_fit_learns_separable_data(head_name, optimizer):
    train, labels = _data(64, 0)
    test, test_labels = _data(33, 1)
    result = fit(_head(head_name), train, labels, test, test_labels,
                 TrainConfig(epochs=6, lr=1e-2 if optimizer == "sgd" else 1e-3, optimizer=optimizer, batch_size=16),
                 progress=False)
    assert result.top1 > 0.8 and result.top5 == 1.0
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_killed_and_resumed_equals_straight_through(tmp_path, monkeypatch):
    train, labels = _data(50, 0)
    config = TrainConfig(epochs=9, lr=0.05, batch_size=16, seed=3, step_size=3)
    straight = _head(seed=7)
    fit(straight, train, labels, train, labels, config, progress=False, checkpoint_dir=tmp_path / "a")

    real = train_module.train_one_epoch
    calls = {"n": 0}

    def dies_in_epoch_five(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_module, "train_one_epoch", dies_in_epoch_five)
    killed = _head(seed=7)
    with pytest.raises(KeyboardInterrupt):
        fit(killed, train, labels, train, labels, config, progress=False, checkpoint_dir=tmp_path / "b")
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["epoch"] == 3

    torch.manual_seed(12345)  # a different global RNG state must not matter after resume
    resumed = _head(seed=99)  # fresh weights: everything comes from the checkpoint
    result = fit(resumed, train, labels, train, labels, config, progress=False, checkpoint_dir=tmp_path / "b",
                 resume=True)
    assert len(result.history) == 9
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_with_other_settings_is_refused(tmp_path):
    train, labels = _data(20, 0)
    fit(_head(), train, labels, train, labels, TrainConfig(epochs=1), progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ProbeError, match="other settings"):
        fit(_head(), train, labels, train, labels, TrainConfig(epochs=1, lr=0.5), progress=False, checkpoint_dir=tmp_path,
            resume=True)


def test_evaluate_top5_and_odd_sizes():
    head = _head()
    test, labels = _data(7, 2)
    scores = evaluate(head, tensor_batches(test, labels, torch.arange(7), batch_size=3))
    logits = head(test)
    assert scores["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert scores["top5"] == 1.0  # 4 classes: top-5 is top-4


def test_rows_and_labels_must_agree():
    train, labels = _data(10, 0)
    with pytest.raises(ProbeError, match="labels"):
        fit(_head(), train, labels[:5], train, labels, TrainConfig(epochs=1), progress=False)
