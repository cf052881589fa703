"""Checkpoint loading: strict or a clear one-line error, never a partial load."""

import re

import pytest
import torch

from extract.checkpoint import compare_state_dict, load_checkpoint, read_state_dict
from extract.configs import create_backbone, get_config
from extract.errors import CheckpointError


def _save(tmp_path, obj, name="ckpt.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_roundtrip_loads_strictly_and_reproduces_outputs(tmp_path):
    torch.manual_seed(1)
    source = get_config("32x32_small").build().eval()
    path = _save(tmp_path, source.state_dict())
    loaded = create_backbone("32x32_small", checkpoint=str(path))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(source(x, t), loaded(x, t))


def test_containers_and_module_prefix_are_unwrapped(tmp_path):
    state = get_config("32x32_small").build().state_dict()
    path = _save(tmp_path, {"state_dict": {f"module.{k}": v for k, v in state.items()}, "step": torch.tensor(3)})
    assert set(read_state_dict(path)) == set(state)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"learn_sigma": False}, r"out\.2\.weight is \(3, 32, 3, 3\), not \(6, 32, 3, 3\).*set learn_sigma=False"),
        ({"class_cond": True}, r"unexpected key.*label_emb\.weight.*set class_cond=True"),
        ({"num_channels": 64}, r"set num_channels=64"),
        ({"attention_resolutions": "16"}, r"attention_resolutions"),
        ({"num_res_blocks": 1}, r"input blocks.*num_res_blocks"),
    ],
)
def test_mismatch_names_keys_shapes_and_the_flag(tmp_path, override, message):
    other = get_config("32x32_small").build(**override)
    path = _save(tmp_path, other.state_dict())
    target = get_config("32x32_small").build()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"checkpoint does not fit 32x32_small: ") as err:
        load_checkpoint(target, path, "32x32_small")
    assert len(str(err.value).splitlines()) == 1
    assert re.search(message, str(err.value)), str(err.value)
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "nothing may be loaded on a mismatch"


def test_a_checkpoint_of_another_named_configuration_is_recognised():
    with torch.device("meta"):
        cond = get_config("256x256_cond").build().state_dict()
        uncond = get_config("256x256_uncond").build()
    problem = compare_state_dict(uncond, cond, "256x256_uncond")
    assert "label_emb.weight" in problem and "use --config 256x256_cond" in problem


def test_missing_empty_truncated_and_foreign_files(tmp_path):
    model = get_config("32x32_small").build()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(model, tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(model, tmp_path / "empty.pt")
    good = _save(tmp_path, model.state_dict(), "good.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_checkpoint(model, tmp_path / "half.pt")
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_checkpoint(model, tmp_path / "notes.pt")
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        load_checkpoint(model, _save(tmp_path, [1, 2, 3], "list.pt"))
