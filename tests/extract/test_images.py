"""Image decoding and preprocessing: every PIL mode to RGB, guided-diffusion resize and crop, bad files reported."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extract.inputs.images import load_batch, load_image, preprocess, resize_center_crop, to_rgb

SIZE = 16


def _halves(width: int, height: int, vertical_split: bool = True) -> Image.Image:
    """Red on the left (or top) half, blue on the right (or bottom) half."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    if vertical_split:
        array[:, : width // 2] = (255, 0, 0)
        array[:, width // 2:] = (0, 0, 255)
    else:
        array[: height // 2] = (255, 0, 0)
        array[height // 2:] = (0, 0, 255)
    return Image.fromarray(array)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _mode_files(folder: Path) -> dict[str, Path]:
    """One file per awkward mode, saved in a format that keeps that mode."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8))
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = 0
    files = {
        "L": _save(rgb.convert("L"), folder / "gray.png"),
        "1": _save(rgb.convert("1"), folder / "bilevel.png"),
        "P": _save(rgb.convert("P"), folder / "palette.png"),
        "P+transparency": _save(palette_transparent, folder / "palette_transparent.png", transparency=0),
        "GIF": _save(rgb.convert("P"), folder / "palette.gif"),
        "LA": _save(rgb.convert("LA"), folder / "gray_alpha.png"),
        "RGBA": _save(rgb.convert("RGBA"), folder / "rgba.png"),
        "CMYK": _save(rgb.convert("CMYK"), folder / "cmyk.jpg"),
        "I;16": _save(Image.fromarray(rng.integers(0, 65536, (30, 45), dtype=np.uint16)), folder / "gray16.png"),
        "RGB-tall": _save(rgb.transpose(Image.Transpose.TRANSPOSE), folder / "tall.jpg"),
        "tiny": _save(rgb.resize((5, 7)), folder / "tiny.bmp"),
    }
    return files


@pytest.mark.parametrize("mode", ["L", "1", "P", "P+transparency", "GIF", "LA", "RGBA", "CMYK", "I;16", "RGB-tall", "tiny"])
def test_every_mode_gives_rgb_in_range(tmp_path, mode):
    path = _mode_files(tmp_path)[mode]
    image = load_image(path, SIZE)
    assert image.shape == (3, SIZE, SIZE)
    assert image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0


def test_gray_modes_have_equal_channels(tmp_path):
    files = _mode_files(tmp_path)
    for mode in ("L", "I;16", "1", "LA"):
        image = load_image(files[mode], SIZE)
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]), mode


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535, 257 * 64]], dtype=np.uint16).repeat(4, axis=0)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb[0, :, 0].tolist() == [0, 128, 255, 64]


def test_rgba_drops_alpha_like_guided_diffusion():
    array = np.zeros((8, 8, 4), dtype=np.uint8)
    array[..., 0] = 200
    array[..., 3] = 0  # fully transparent: the colour underneath is kept
    assert np.asarray(to_rgb(Image.fromarray(array, "RGBA")))[0, 0].tolist() == [200, 0, 0]


@pytest.mark.parametrize("flip", [False, True])
def test_wide_image_crop_keeps_orientation(flip):
    # 64x32 with red left half: short side 32 -> 16, the 32-wide result is center-cropped to 16,
    # so the crop is red on its left 8 columns and blue on its right 8.
    image = preprocess(_halves(64, 32), SIZE, flip=flip)
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    left, right = (blue, red) if flip else (red, blue)
    assert torch.allclose(image[:, SIZE // 2, 1], left, atol=0.05)
    assert torch.allclose(image[:, SIZE // 2, SIZE - 2], right, atol=0.05)


def test_tall_image_crop_keeps_top_and_bottom():
    image = preprocess(_halves(32, 96, vertical_split=False), SIZE)
    assert torch.allclose(image[:, 1, SIZE // 2], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)
    assert torch.allclose(image[:, SIZE - 2, SIZE // 2], torch.tensor([-1.0, -1.0, 1.0]), atol=0.05)


def test_pixels_equal_an_independent_computation_without_resize():
    # Short side already S: no resize, a center crop of offset (50 - 40) // 2 = 5, then x / 127.5 - 1.
    array = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    expected = array[:, 5:45].astype(np.float64) / 127.5 - 1.0
    image = preprocess(Image.fromarray(array), 40)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_downsampling_of_block_constant_image_is_exact():
    # A 4x4-block-constant 64x64 image: 64 -> 32 -> 16 by two exact BOX halvings, no bicubic
    # change, so every output pixel is its block's colour exactly.
    blocks = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    array = blocks.repeat(4, axis=0).repeat(4, axis=1)
    image = preprocess(Image.fromarray(array), SIZE)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), blocks / 127.5 - 1.0, atol=1e-6)


def test_downsampling_averages_like_box_halving():
    # Random pixels: two halvings are 2x2 means of 2x2 means, equal up to PIL's integer rounding.
    array = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8).astype(np.float64)
    once = (array[0::2, 0::2] + array[1::2, 0::2] + array[0::2, 1::2] + array[1::2, 1::2]) / 4
    twice = (once[0::2, 0::2] + once[1::2, 0::2] + once[0::2, 1::2] + once[1::2, 1::2]) / 4
    image = preprocess(Image.fromarray(array.astype(np.uint8)), SIZE)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), twice / 127.5 - 1.0, atol=2.01 / 127.5)


def test_resize_matches_pil_bicubic_for_upsampling():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (10, 20, 3), dtype=np.uint8))
    out = resize_center_crop(image, 30)  # short side 10 -> 30, so 20 -> 60, crop columns 15..45
    expected = image.resize((60, 30), resample=Image.Resampling.BICUBIC).crop((15, 0, 45, 30))
    assert out.size == (30, 30)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def _jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    array = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("num_threads", [1, 3])
def test_bad_files_are_reported_not_raised(tmp_path, num_threads):
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg_bytes())
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_jpeg_bytes()[: len(_jpeg_bytes()) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all" * 10)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    paths = [truncated, good, garbage, empty, missing]

    images, ok, errors = load_batch(paths, SIZE, num_threads=num_threads)

    assert images.shape == (5, 3, SIZE, SIZE)
    assert ok.dtype == bool and ok.tolist() == [False, True, False, False, False]
    assert sorted(errors) == [0, 2, 3, 4]
    for row, reason in errors.items():
        assert reason and "\n" not in reason, row
        assert torch.count_nonzero(images[row]) == 0
    assert "truncated" in errors[0].lower()
    assert torch.equal(images[1], load_image(good, SIZE))


def test_flip_view_is_the_mirror_of_the_plain_view(tmp_path):
    paths = [_save(_halves(48, 32), tmp_path / "a.png"), tmp_path / "missing.png"]
    plain, ok_plain, _ = load_batch(paths, SIZE)
    flipped, ok_flipped, errors = load_batch(paths, SIZE, flip=True)
    assert ok_plain.tolist() == ok_flipped.tolist() == [True, False]
    assert torch.equal(flipped, plain.flip(-1))
    assert list(errors) == [1]


def test_cifar10_images_pass_through_unchanged_at_their_size(cifar10_root):
    paths = sorted((cifar10_root / "test" / "cat").iterdir())[:4]
    images, ok, errors = load_batch(paths, 32)
    assert ok.all() and not errors
    for path, image in zip(paths, images):
        with Image.open(path) as pil:
            expected = np.asarray(pil.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)
    upsampled, ok, _ = load_batch(paths, 64)
    assert upsampled.shape == (4, 3, 64, 64) and ok.all()
    assert upsampled.min() >= -1.0 and upsampled.max() <= 1.0
