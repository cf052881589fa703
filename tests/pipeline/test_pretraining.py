"""The pretraining probe check: its x_t and 2x2 features against q_sample and pooling computed by hand."""

import numpy as np
import torch
from torch.nn import functional as F

from extract.backbone.configs import get_config
from extract.backbone.registry import create_backbone
from extract.backbone.pretrain import PretrainConfig
from extract.inputs.images import load_batch
from extract.noise import seeded_noise
from extract.schedule import get_schedule
from pipeline.datasets import build_index
from pipeline.pretraining import PretrainRequest, ProbeCheck

torch.set_num_threads(1)
CONFIG = get_config("32x32_small")
SCHEDULE = get_schedule(CONFIG.noise_schedule, CONFIG.diffusion_steps)


def _check(cifar10_root, **options) -> ProbeCheck:
    request = PretrainRequest(config=PretrainConfig("32x32_small"), data_root=str(cifar10_root.parent),
                              probe_train_per_class=2, probe_test_per_class=1, probe_timestep=25, **options)
    return ProbeCheck(request, torch.device("cpu"))


def test_probe_check_features_are_seeded_noise_and_a_2x2_pool(cifar10_root):
    check = _check(cifar10_root)
    index = build_index("cifar10", "train", root=str(cifar10_root.parent), per_class=2)
    images, ok, _ = load_batch(index.paths, 32)
    assert ok.all()
    ids = list(range(len(index.paths)))
    by_hand = SCHEDULE.q_sample(images, torch.full((len(ids),), 25), seeded_noise(0, ids, 25, (3, 32, 32), split="train"))
    x_t, labels = check.data[0]
    assert torch.equal(x_t, by_hand), "the default noise seed is 0, as before it was a parameter"
    assert torch.equal(labels, torch.from_numpy(np.asarray(index.labels)))

    model = create_backbone("32x32_small", weight_seed=1)
    with torch.no_grad():
        maps = model.features(x_t, torch.full((len(ids),), 25), [check.block])[check.block]
    expected = F.adaptive_avg_pool2d(maps.float(), 2).flatten(1)
    assert torch.equal(check.features(model, x_t), expected)


def test_probe_check_noise_seed_is_a_parameter(cifar10_root):
    default, other = _check(cifar10_root), _check(cifar10_root, probe_noise_seed=3)
    for (x_default, _), (x_other, _) in zip(default.data, other.data):
        assert not torch.equal(x_default, x_other)
    images = load_batch(build_index("cifar10", "test", root=str(cifar10_root.parent), per_class=1).paths, 32)[0]
    noise = seeded_noise(3, range(len(images)), 25, (3, 32, 32), split="test")
    assert torch.equal(other.data[1][0], SCHEDULE.q_sample(images, torch.full((len(images),), 25), noise))
