"""The live-backbone path: LiveHead equals features computed by hand, steps, resume, fine-tuning, pass 1 from the cache."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract.backbone.configs import bundled_checkpoint, get_config
from extract.backbone.registry import create_backbone
from extract.inputs.images import load_batch
from extract.noise import seeded_noise
from extract.schedule import get_schedule
from fusion.diffeed import DifFeed
from probe.live_images import LiveImages
from probe.heads import create_head
from probe.live_head import LiveHead, live_in_shapes
from probe.train import BACKBONE_NAME, CHECKPOINT_NAME, TrainConfig, fit

torch.set_num_threads(1)
CONFIG = "32x32_small"


@pytest.fixture(scope="module")
def images(cifar10_root):
    """Three test images of each class: (paths, labels)."""
    paths, labels = [], []
    for label, folder in enumerate(sorted((Path(cifar10_root) / "test").iterdir())):
        for image in sorted(folder.iterdir())[:3]:
            paths.append(str(image))
            labels.append(label)
    return paths, np.asarray(labels)


def _source(images, **options):
    cfg = get_config(CONFIG)
    schedule = get_schedule(cfg.noise_schedule, cfg.diffusion_steps)
    return LiveImages(*images, cfg.image_size, options.pop("timesteps", (25, 90)), schedule, decode_threads=1, **options)


def test_live_head_sees_the_pooled_features_of_the_seeded_noisy_images(images):
    """Seeded noise, no augmentation: the head gets exactly the cache's pooled features, computed here by hand."""
    backbone = create_backbone(CONFIG, weight_seed=3)
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, features):
            seen.update(features)
            return torch.zeros(next(iter(features.values())).shape[0], 10)

    model = LiveHead(backbone, Spy(), blocks=[4, 10], timesteps=[25, 90], pool=4)
    batch, labels = next(_source(images).batches(8))
    model(batch)
    x0, ok, _ = load_batch(images[0][:8], 32, num_threads=1)
    schedule = get_schedule("linear", 1000)
    for t in (25, 90):
        x_t = schedule.q_sample(x0, torch.full((8,), t), seeded_noise(0, list(range(8)), t, (3, 32, 32)))
        maps = backbone.features(x_t, torch.full((8,), t), [4, 10])
        for b in (4, 10):
            expected = torch.nn.functional.adaptive_avg_pool2d(maps[b], 4).half().float()
            assert torch.equal(seen[(b, t)], expected), (b, t)
    assert torch.equal(labels, torch.from_numpy(images[1][:8]))


def test_augmented_fresh_batches_differ_by_epoch_and_repeat_by_seed(images):
    source = _source(images, fresh_noise=True, augment=True, timesteps=(25,))
    first = next(source.batches(6, seed=1, epoch=0))[0][(0, 25)]
    again = next(source.batches(6, seed=1, epoch=0))[0][(0, 25)]
    other = next(source.batches(6, seed=1, epoch=1))[0][(0, 25)]
    assert torch.equal(first, again) and not torch.equal(first, other)


def _live_model(finetune=False):
    torch.manual_seed(0)
    backbone = create_backbone(CONFIG, weight_seed=1)
    head = create_head("linear", live_in_shapes(backbone, [10], [25], 4), 10, pool=2)
    return LiveHead(backbone, head, [10], [25], 4, finetune=finetune)


def test_steps_stop_training_inside_an_epoch(images):
    model = _live_model()
    result = fit(model, _source(images, timesteps=(25,)), None, _source(images, timesteps=(25,)), None,
                 TrainConfig(epochs=5, steps=4, batch_size=6, optimizer="adam", lr=1e-3), progress=False)
    assert result.epochs == 1 and len(result.history) == 1  # 30 images / 6 = 5 steps an epoch: 4 steps end in epoch 1


def test_a_live_run_killed_mid_epoch_resumes_to_the_same_weights(images, tmp_path):
    """Fresh noise + crops every step, fine-tuned backbone: killed in epoch 2, resumed, bit-equal to a straight run."""
    def run(directory, source, resume=False, finetune=True):
        model = _live_model(finetune)
        fit(model, source, None, _source(images, timesteps=(25,)), None,
            TrainConfig(epochs=2, batch_size=6, optimizer="sgd", lr=1e-2, backbone_lr=1e-3),
            checkpoint_dir=directory, resume=resume, progress=False)
        return model

    straight = run(tmp_path / "straight", _source(images, fresh_noise=True, augment=True, timesteps=(25,)))

    class Killed(Exception):
        pass

    class DiesInEpoch2:
        def __init__(self, inner):
            self.inner, self.num_images = inner, inner.num_images

        def batches(self, batch_size, seed=None, epoch=0):
            for number, batch in enumerate(self.inner.batches(batch_size, seed, epoch)):
                if epoch == 1 and number == 2:
                    raise Killed
                yield batch

    fresh = _source(images, fresh_noise=True, augment=True, timesteps=(25,))
    with pytest.raises(Killed):
        run(tmp_path / "killed", DiesInEpoch2(fresh))
    resumed = run(tmp_path / "killed", fresh, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(k.startswith("backbone.") for k in straight.state_dict())  # the tuned backbone is in the checkpoint


def test_finetuning_trains_the_read_blocks_and_writes_a_loadable_official_checkpoint(images, tmp_path):
    model = _live_model(finetune=True)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    fit(model, _source(images, timesteps=(25,)), None, _source(images, timesteps=(25,)), None,
        TrainConfig(epochs=1, batch_size=10, optimizer="sgd", lr=1e-2, backbone_lr=1e-2), checkpoint_dir=tmp_path,
        progress=False)
    assert (tmp_path / CHECKPOINT_NAME).exists()
    tuned = create_backbone(CONFIG, checkpoint=str(tmp_path / BACKBONE_NAME))  # strict load in the official layout
    state = tuned.state_dict()
    changed = {k for k in before if not torch.equal(before[k], state[k])}
    assert any(k.startswith("input_blocks.") for k in changed)  # blocks 1..10 read: trained
    assert not any(k.startswith("output_blocks.") or k.startswith("out.") for k in changed)  # past block 10: untouched
    assert all(torch.equal(state[k], v) for k, v in model.backbone.state_dict().items())


def test_frozen_checkpoints_leave_the_backbone_out(images, tmp_path):
    model = _live_model()
    fit(model, _source(images, timesteps=(25,)), None, _source(images, timesteps=(25,)), None,
        TrainConfig(epochs=1, batch_size=10, optimizer="sgd", lr=1e-2), checkpoint_dir=tmp_path, progress=False)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["head"]
    assert saved and not any(k.startswith("backbone.") for k in saved) and not (tmp_path / BACKBONE_NAME).exists()


def test_diffeed_finetunes_pass_two_only(images):
    torch.manual_seed(0)
    backbone = create_backbone(CONFIG, weight_seed=1)
    head = create_head("attention", {(15, 25): (64, 16, 16)}, 10, dim=32, depth=1)
    model = DifFeed(backbone, head, "bottleneck", finetune=True)
    batch, labels = next(_source(images, timesteps=(25,)).batches(6))
    torch.nn.functional.cross_entropy(model(batch), labels).backward()
    grads = {name for name, p in backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("input_blocks.") for n in grads)  # pass 2 reaches the encoder
    last = backbone.block_module_name(16)
    assert not any(n.startswith(last) for n in grads)  # blocks after the read-out (15) get nothing


@pytest.mark.e2e
def test_diffeed_reads_pass_one_from_a_full_map_cache(cifar10_root, tmp_path):
    """The plan says the cache gives pass 1, and DifFeed's logits equal those with pass 1 run live (float16 apart)."""
    from pipeline.cli.main import main
    from pipeline.feedback import FeedbackRequest, plan_feedback

    root = tmp_path / "data"
    for folder in sorted((Path(cifar10_root) / "test").iterdir()):
        (root / "cifar10-jpg" / "test" / folder.name).mkdir(parents=True)
        (root / "cifar10-jpg" / "train" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:4]:
            shutil.copyfile(image, root / "cifar10-jpg" / "test" / folder.name / image.name)
            shutil.copyfile(image, root / "cifar10-jpg" / "train" / folder.name / image.name)
    cache = tmp_path / "cache"
    result = CliRunner().invoke(main, ["extract", "--dataset", "cifar10", "--config", CONFIG, "--weight-seed", "2",
                                       "-b", "12,15,18", "-t", "25", "--pool", "none", "--data-root", str(root),
                                       "--cache-dir", str(cache), "--no-progress", "--synchronous"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    base = dict(dataset="cifar10", timestep=25, config_name=CONFIG, weight_seed=2, data_root=str(root), dim=32, depth=1,
                device="cpu", decode_threads=1)
    cached = plan_feedback(FeedbackRequest(cache_dir=str(cache), **base))
    live = plan_feedback(FeedbackRequest(cache_dir=None, **base))
    assert "pass 1 (train) read from the cache" in cached.describe() and "runs live (no cache asked for)" in live.describe()
    assert cached.forwards == live.forwards // 2
    live.model.load_state_dict(cached.model.state_dict())
    cached.model.eval(), live.model.eval()
    (batch, _), (plain, _) = next(cached.test.batches(20)), next(live.test.batches(20))
    assert set(batch) == {(0, 25), (12, 25), (15, 25), (18, 25)} and torch.equal(batch[(0, 25)], plain[(0, 25)])
    with torch.no_grad():
        assert torch.allclose(cached.model(batch), live.model(plain), atol=2e-2, rtol=1e-2)
    other = plan_feedback(FeedbackRequest(cache_dir=str(cache), **{**base, "noise_seed": 5}))
    assert "the cache's noise seed is 0, not 5" in other.describe()
    result = CliRunner().invoke(main, ["feedback", "--dataset", "cifar10", "--config", CONFIG, "--weight-seed", "2",
                                       "-t", "25", "--data-root", str(root), "--cache-dir", str(cache), "--noise-seed",
                                       "5", "--pass1", "cache", "--dry-run"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "--pass1 cache: pass 1 cannot come from the cache: the cache's noise seed is 0, not 5" in result.output


def test_live_probe_refuses_what_it_cannot_do_in_one_line(tmp_path):
    from pipeline.cli.main import main

    base = ["probe", "--live", "--dataset", "cifar10", "--config", CONFIG, "-b", "10", "-t", "5",
            "--data-root", str(tmp_path / "nowhere"), "--results", str(tmp_path / "r.parquet")]
    for extra, needle in ((["--stream"], "--live reads images, not the cache: drop --stream"),
                          (["--solver", "lbfgs"], "--live trains by gradient steps: pass --solver sgd or adam"),
                          (["--lr", "1e-3,1e-2"], "--live trains one head at a time: pass one --lr"),
                          (["-b", "40"], "block 40 is out of range for 32x32_small: valid blocks are 1..19")):
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code == 1, result.output
        assert needle in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "r.parquet").exists()


@pytest.mark.e2e
def test_live_probe_and_finetune_from_the_command_line(cifar10_root, tmp_path):
    """diffrep probe --live on 300 real train images beats chance; --finetune writes a backbone --checkpoint loads."""
    from pipeline.cli.main import main
    from pipeline.results import read_results

    checkpoint = bundled_checkpoint(CONFIG)
    base = ["probe", "--live", "--dataset", "cifar10", "--config", CONFIG, "-b", "10", "-t", "5", "--per-class", "30",
            "--test-per-class", "20", "--data-root", str(cifar10_root.parent), "--cache-pool", "4", "--solver", "adam",
            "--lr", "1e-3", "--batch-size", "30", "--device", "cpu", "--no-progress",
            "--results", str(tmp_path / "r.parquet"), *(["--checkpoint", checkpoint] if checkpoint else [])]
    result = CliRunner().invoke(main, [*base, "--epochs", "6", "--checkpoint-dir", str(tmp_path / "live")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "live backbone, fresh noise, crop+flip, adam" in result.output
    row = read_results(tmp_path / "r.parquet").to_pylist()[-1]
    assert row["protocol"] == "live" and row["fresh_noise"] and row["augment"] and not row["finetune"]
    assert row["train_size"] == 300 and row["test_size"] == 200 and row["top1"] > 0.2  # chance 10%
    tuned = CliRunner().invoke(main, [*base, "--epochs", "1", "--finetune", "--checkpoint-dir", str(tmp_path / "ft")],
                               catch_exceptions=False)
    assert tuned.exit_code == 0 and f"loadable by --checkpoint): {tmp_path / 'ft' / BACKBONE_NAME}" in tuned.output
    assert read_results(tmp_path / "r.parquet").to_pylist()[-1]["finetune"]
    again = [*[a for a in base if a != checkpoint and a != "--checkpoint"], "--checkpoint", str(tmp_path / "ft" / BACKBONE_NAME)]
    reused = CliRunner().invoke(main, [*again, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "reuse")],
                                catch_exceptions=False)
    assert reused.exit_code == 0, reused.output
