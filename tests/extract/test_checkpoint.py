"""Checkpoint loading: strict or a clear one-line error, never a partial load."""

import re

import pytest
import torch

from extract.backbone.checkpoint import compare_state_dict, read_state_dict
from extract.backbone.configs import check_checkpoint, explain_mismatch, get_config
from extract.backbone.registry import create_backbone
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
    with pytest.raises(CheckpointError, match=r"checkpoint does not fit 32x32_small: ") as err:
        create_backbone("32x32_small", checkpoint=str(path))
    assert len(str(err.value).splitlines()) == 1
    assert re.search(message, str(err.value)), str(err.value)
    with pytest.raises(CheckpointError, match=r"checkpoint does not fit 32x32_small: "):
        check_checkpoint("32x32_small", str(path))


def test_a_checkpoint_of_another_named_configuration_is_recognised():
    with torch.device("meta"):
        cond = get_config("256x256_cond").build().state_dict()
        uncond = get_config("256x256_uncond").build()
    problem = explain_mismatch(uncond, cond, "256x256_uncond")
    assert "label_emb.weight" in problem and problem.endswith("it fits 256x256_cond: use --config 256x256_cond")
    plain = compare_state_dict(uncond, cond, "256x256_uncond")  # checkpoint.py alone knows no named configuration
    assert plain == problem.replace("it fits 256x256_cond: use --config 256x256_cond", "set class_cond=True")


def test_missing_empty_truncated_and_foreign_files(tmp_path):
    model = get_config("32x32_small").build()

    def load(name):
        return create_backbone("32x32_small", checkpoint=str(tmp_path / name))

    with pytest.raises(CheckpointError, match="does not exist"):
        load("nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load("empty.pt")
    good = _save(tmp_path, model.state_dict(), "good.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch file: it is a zip archive, as PyTorch writes "
                                              "them, but truncated or damaged; pass the official .pt file"):
        load("half.pt")
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        create_backbone("32x32_small", checkpoint=str(_save(tmp_path, [1, 2, 3], "list.pt")))


def test_a_text_file_as_checkpoint_gets_a_whole_sentence(tmp_path):
    notes = "these are not weights but notes " * 20
    (tmp_path / "notes.pt").write_text(notes + "\n")
    with pytest.raises(CheckpointError) as err:
        create_backbone("32x32_small", checkpoint=str(tmp_path / "notes.pt"))
    message = str(err.value)
    assert message == (f"checkpoint {tmp_path / 'notes.pt'} is not a readable PyTorch file: it is a text file "
                       f"(starting {notes[:40]!r}...); pass the official .pt file (download it again if it was cut short)")

