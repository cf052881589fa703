"""Diffusion pretraining: the loss, learning on real images, and a killed run resumed to the same bits."""

import json

import numpy as np
import pytest
import torch

from extract.backbone.configs import get_config
from extract.backbone.diffusion_loss import diffusion_loss
from extract.backbone.pretrain import EMA_NAME, MODEL_NAME, PretrainConfig, pretrain
from extract.backbone.registry import create_backbone
from extract.errors import ConfigError
from extract.schedule import get_schedule


class _Oracle(torch.nn.Module):
    """Predicts the true noise and the true posterior variance (v = -1 picks the clipped posterior log variance)."""

    def __init__(self, noise, v):
        super().__init__()
        self.noise, self.v = noise, v

    def forward(self, x, t):
        return torch.cat([self.noise, torch.full_like(self.noise, self.v)], dim=1)


def test_vb_term_vanishes_for_the_true_posterior_and_mse_for_the_true_noise():
    schedule = get_schedule("linear")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(6, 3, 8, 8, generator=generator)
    t = torch.tensor([1, 5, 50, 400, 800, 999])
    loss, terms = diffusion_loss(_Oracle(noise, -1.0), schedule, x0, t, noise, learn_sigma=True)
    assert terms["mse"].abs().max() < 1e-10
    assert terms["vb"].abs().max() < 1e-4  # KL(q || p) = 0 when p is q
    _, wrong = diffusion_loss(_Oracle(noise, 1.0), schedule, x0, t, noise, learn_sigma=True)
    # v = 1 picks variance beta_t with the right mean: KL of two Gaussians of one mean, in bits per dimension
    q = schedule.posterior_log_variance_clipped[t.numpy()]
    p = np.log(schedule.betas[t.numpy()])
    expected = 0.5 * (p - q + np.exp(q - p) - 1) / np.log(2)
    np.testing.assert_allclose(wrong["vb"].numpy(), expected, rtol=2e-3, atol=1e-6)
    mse_only, plain = diffusion_loss(lambda x, t: noise + 0.5, schedule, x0, t, noise, learn_sigma=False)
    assert mse_only.item() == pytest.approx(0.25) and plain["vb"].eq(0).all()


def test_discretized_likelihood_at_t0_is_a_probability():
    """At t = 0 the VB term is the decoder's negative log-likelihood in bits per dimension: positive."""
    schedule = get_schedule("linear")
    x0 = torch.linspace(-1, 1, 3 * 4 * 4).reshape(1, 3, 4, 4)
    noise = torch.zeros_like(x0)
    _, terms = diffusion_loss(_Oracle(noise, 0.0), schedule, x0, torch.tensor([0]), noise, learn_sigma=True)
    assert terms["vb"].item() > 0


def _paths(cifar10_root, n):
    return sorted(str(p) for p in (cifar10_root / "train").glob("*/*.jpg"))[:: 5000 // n][:n]


@pytest.mark.e2e
def test_pretraining_on_real_images_lowers_the_loss(cifar10_root, tmp_path):
    config = PretrainConfig(batch_size=8, lr=2e-3, warmup_steps=2, ema_decay=0.9, threads=1)
    result = pretrain(config, _paths(cifar10_root, 16), tmp_path, steps=40, log_every=5, checkpoint_every=40,
                      progress=False)
    rows = np.genfromtxt(tmp_path / "loss.csv", delimiter=",", names=True)
    assert rows["loss"][-2:].mean() < 0.5 * rows["loss"][0]
    assert result.step == 40 and result.images_seen == 320 and result.stopped_by == "steps"
    meta = json.loads((tmp_path / "ema.json").read_text())
    assert meta["steps"] == 40 and meta["images_seen"] == 320 and meta["flags"]["num_channels"] == 32
    assert meta["config"]["lr"] == 2e-3 and meta["wall_seconds"] > 0 and np.isfinite(meta["final_loss"])
    model = create_backbone("32x32_small", checkpoint=str(tmp_path / EMA_NAME))  # strict, official layout
    saved = torch.load(tmp_path / EMA_NAME, weights_only=True)
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())
    assert all(value.is_contiguous() for value in saved.values())


class _Killed(Exception):
    pass


@pytest.mark.e2e
def test_killed_and_resumed_pretraining_equals_a_straight_run(cifar10_root, tmp_path):
    config = PretrainConfig(batch_size=4, warmup_steps=2, threads=1)
    paths = _paths(cifar10_root, 10)
    pretrain(config, paths, tmp_path / "straight", steps=6, checkpoint_every=3, progress=False)

    def kill(model, step):
        raise _Killed(step)

    with pytest.raises(_Killed):
        pretrain(config, paths, tmp_path / "killed", steps=6, checkpoint_every=3, on_checkpoint=kill, progress=False)
    resumed = pretrain(config, paths, tmp_path / "killed", steps=6, checkpoint_every=3, resume=True, progress=False)
    assert resumed.step == 6
    for name in (EMA_NAME, MODEL_NAME):
        a = torch.load(tmp_path / "straight" / name, weights_only=True)
        b = torch.load(tmp_path / "killed" / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(ConfigError, match="other settings"):
        pretrain(PretrainConfig(batch_size=4, warmup_steps=2, threads=1, lr=5e-4), paths, tmp_path / "killed",
                 steps=7, resume=True, progress=False)


def test_refuses_what_it_cannot_train(tmp_path):
    with pytest.raises(ConfigError, match="--steps N or --minutes M"):
        pretrain(PretrainConfig(), ["x.jpg"], tmp_path)
    with pytest.raises(ConfigError, match="class-conditional"):
        pretrain(PretrainConfig(config_name="64x64_cond"), ["x.jpg"], tmp_path, steps=1)
    with pytest.raises(ConfigError, match="classifier"):
        pretrain(PretrainConfig(config_name="64x64_classifier"), ["x.jpg"], tmp_path, steps=1)
    assert get_config("32x32_small").flags["learn_sigma"]


def test_pretraining_continues_from_a_checkpoint_on_a_segmentation_datasets_images(tmp_path):
    """``--init`` starts from the given weights (one step at a vanishing rate leaves them); camvid's frames train
    without labels; a resume with another init file is refused."""
    from click.testing import CliRunner

    from extract.backbone.checkpoint import read_state_dict
    from extract.backbone.configs import bundled_checkpoint
    from pipeline.cli.main import main
    from tests.pipeline.test_dense_data import dense

    dense("camvid", "train")  # unpacked, or a skip naming the missing archive
    bundled = bundled_checkpoint("32x32_small")
    args = ["pretrain", "--config", "32x32_small", "--dataset", "camvid", "--limit", "4", "--steps", "1",
            "--batch-size", "2", "--lr", "1e-12", "--warmup", "0", "--threads", "1", "--no-progress", "--decode-threads", "1"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "init"), "--init", bundled])
    assert result.exit_code == 0, result.output
    start, after = read_state_dict(bundled), read_state_dict(tmp_path / "init" / "model.pt")
    assert max((start[k].float() - after[k].float()).abs().max().item() for k in start) < 1e-6
    meta = json.loads((tmp_path / "init" / "ema.json").read_text())
    assert meta["data"]["dataset"] == "camvid" and meta["data"]["images"] == 4 and meta["data"]["init"] == "32x32_small.pt"
    fresh = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "fresh")])
    assert fresh.exit_code == 0, fresh.output
    assert max((start[k].float() - read_state_dict(tmp_path / "fresh" / "model.pt")[k].float()).abs().max().item()
               for k in start) > 1e-2
    other = tmp_path / "other.pt"
    torch.save({k: v + 1 for k, v in start.items()}, other)
    refused = CliRunner().invoke(main, [*args, "--steps", "2", "--out", str(tmp_path / "init"), "--init", str(other), "--resume"])
    assert refused.exit_code != 0 and "init_sha256" in refused.output and "Traceback" not in refused.output
