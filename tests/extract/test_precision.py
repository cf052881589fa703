"""Autocast precision options of the backbone."""

import pytest
import torch

from extract.backbone.configs import get_config
from extract.errors import ConfigError
from extract.precision import autocast, resolve_device


def test_bf16_autocast_runs_the_backbone_close_to_float32():
    torch.manual_seed(0)
    model = get_config("32x32_small").build().eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([90, 150])
    with torch.no_grad():
        full = model.features(x, t, [10])[10]
        with autocast("cpu", "bf16"):
            half = model.features(x, t, [10])[10]
    assert half.dtype == torch.bfloat16
    rel = (half.float() - full).norm() / full.norm()
    assert 0 < rel < 0.05


def test_bad_precision_and_device():
    with pytest.raises(ConfigError, match="choose fp32, bf16, fp16"):
        autocast("cpu", "int8")
    with pytest.raises(ConfigError, match="needs a GPU"):
        autocast("cpu", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"


def test_a_worker_pinned_by_the_cluster_gets_its_device(monkeypatch):
    monkeypatch.setenv("DIFFREP_DEVICE", "cpu")  # a multi-GPU local cluster sets cuda:N per worker
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cuda").type == "cpu"
    monkeypatch.delenv("DIFFREP_DEVICE")
    assert resolve_device("cpu").type == "cpu"


def test_auto_precision_is_bf16_on_a_gpu_and_fp32_on_the_cpu(monkeypatch):
    from extract.precision import resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16" and resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setenv("DIFFREP_DEVICE", "cpu")
    assert resolve_precision("auto", "auto") == "fp32"
    monkeypatch.delenv("DIFFREP_DEVICE")
    assert resolve_precision("auto", "auto") == ("bf16" if torch.cuda.is_available() else "fp32")
    with pytest.raises(ConfigError, match="choose auto, fp32"):
        resolve_precision("half", "cpu")
