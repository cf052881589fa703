"""GPU decoding's resize against PIL's, its batch decoding (run here on the CPU), and the one-line refusals."""

import numpy as np
import pytest
import torch
from PIL import Image

from extract.inputs.device_decode import check_decode_device, load_pixels_on_device, resize_center_crop_tensor
from extract.errors import ConfigError
from extract.inputs.images import load_pixels, resize_center_crop


def _photo(width, height, seed=0):
    """A smooth image with edges (a resize of noise), closer to a photo than raw noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("width,height,size", [
    (500, 375, 256), (500, 375, 32), (375, 500, 64), (333, 500, 100), (187, 93, 17), (640, 480, 64), (20, 30, 64),
])
def test_tensor_resize_is_pil_bit_for_bit(width, height, size):
    image = _photo(width, height)
    expected = np.asarray(resize_center_crop(image, size)).transpose(2, 0, 1)
    got = resize_center_crop_tensor(torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()), size)
    assert got.dtype == torch.uint8 and got.shape == (3, size, size)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_batch_decoding_matches_pil_and_reports_bad_files(tmp_path):
    pytest.importorskip("torchvision")
    paths = []
    for i, (w, h) in enumerate([(500, 375), (375, 500), (64, 48)]):
        path = tmp_path / f"{i}.jpg"
        _photo(w, h, seed=i).save(path, quality=90)
        paths.append(str(path))
    png = tmp_path / "gray.png"  # not a JPEG: PIL decodes it
    _photo(60, 40).convert("L").save(png)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths += [str(png), str(broken), str(tmp_path / "missing.jpg")]
    pixels, ok, errors = load_pixels_on_device(paths, 32, "cpu")
    assert ok.tolist() == [True, True, True, True, False, False]
    assert sorted(errors) == [4, 5] and "FileNotFoundError" in errors[5]
    for row in range(4):
        # torchvision's CPU decoder and PIL's are both libjpeg-turbo: same pixels here (nvJPEG may differ)
        np.testing.assert_array_equal(pixels[row].numpy(), load_pixels(paths[row], 32))
    assert not pixels[4:].any()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_asking_for_gpu_decoding_without_a_gpu_is_one_line():
    with pytest.raises(ConfigError, match="needs a CUDA GPU and this machine has none") as info:
        check_decode_device("cuda", "cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="choose cpu or cuda"):
        check_decode_device("gpu", "cpu")
    check_decode_device("cpu", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_extract_command_refuses_gpu_decoding_before_planning(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli.main import main

    result = CliRunner().invoke(main, [
        "extract", "--dataset", "cifar10", "--split", "test", "-t", "90", "-b", "10", "--config", "32x32_small",
        "--decode-device", "cuda", "--dry-run", "--cache-dir", str(tmp_path),
    ])
    assert result.exit_code != 0
    assert "--decode-device cuda needs a CUDA GPU" in result.output and not (tmp_path / "cifar10").exists()
