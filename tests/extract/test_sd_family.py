"""The Stable Diffusion family against diffusers' and transformers' own computations, on a tiny random SD saved to disk.

diffrep's truncated walk is compared with diffusers' full ``UNet2DConditionModel`` forward
(block maps captured by forward hooks at the mapped modules), its latent with ``AutoencoderKL.encode``,
its schedule with ``DDPMScheduler``'s scaled-linear betas and ``add_noise``, its null text with the
text encoder run on the tokenizer's ``""``.
"""

import os

import pytest
import torch
from click.testing import CliRunner

from extract.backbone.registry import create_backbone, family_of
from extract.errors import CheckpointError
from extract.forward import model_input
from extract.schedule import get_schedule
from pipeline.cli.main import main
from tests.extract.sd_tiny import TINY, build_tiny_sd, save_single_file, save_tiny_sd

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=3)


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    return create_backbone("sd-tiny", checkpoint=str(tiny_folder))


@pytest.fixture(scope="module")
def reference(tiny_folder):
    """The same weights loaded by diffusers and transformers directly."""
    from extract.backbone.sd_family import offline_libraries

    diffusers, transformers = offline_libraries()
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_folder, subfolder="unet", local_files_only=True).eval()
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_folder, subfolder="vae", local_files_only=True).eval()
    text = transformers.CLIPTextModel.from_pretrained(tiny_folder, subfolder="text_encoder", local_files_only=True).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tiny_folder, subfolder="tokenizer", local_files_only=True)
    scheduler = diffusers.DDPMScheduler.from_pretrained(tiny_folder, subfolder="scheduler", local_files_only=True)
    return unet, vae, text, tokenizer, scheduler


def _hooked_full_forward(backbone, unet, x_t, t, context):
    """Block maps of diffusers' own full forward, captured at the modules diffrep maps each b to."""
    caught = {}

    def hook(b):
        return lambda _m, _i, out: caught.__setitem__(b, out[0] if isinstance(out, tuple) else out)

    handles = [unet.get_submodule(backbone.block_module_name(b)).register_forward_hook(hook(b))
               for b in range(1, backbone.num_blocks + 1)]
    try:
        with torch.no_grad():
            unet(x_t, t, encoder_hidden_states=context)
    finally:
        for handle in handles:
            handle.remove()
    return caught


def test_null_text_is_the_text_encoders_output_for_the_empty_prompt(loaded, reference):
    _, _, text, tokenizer, _ = reference
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    assert ids[0, 0].item() == 62 and set(ids[0, 1:].tolist()) == {63}
    with torch.no_grad():
        expected = text(ids).last_hidden_state
    assert loaded.null_text.shape == (1, 77, TINY.context_dim)
    torch.testing.assert_close(loaded.null_text, expected, rtol=0, atol=0)


def test_schedule_and_noising_equal_diffusers_scaled_linear(reference):
    scheduler = reference[4]
    ours = family_of("sd-tiny").schedule("sd-tiny")
    torch.testing.assert_close(torch.from_numpy(ours.alphas_cumprod).float(), scheduler.alphas_cumprod, rtol=1e-6, atol=0)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    expected = scheduler.add_noise(x0, noise, torch.tensor([250] * 3))
    torch.testing.assert_close(ours.q_sample(x0, 250, noise), expected, rtol=1e-5, atol=1e-6)


def test_latent_is_the_vae_posterior_mean_times_the_scaling_factor(loaded, reference):
    vae = reference[1]
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    latent = model_input(loaded, pixels)
    assert latent.shape == (2, 4, 8, 8) and loaded.input_shape(64) == (4, 8, 8)
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-6)


def test_truncated_features_of_every_block_equal_diffusers_full_forward(loaded, reference):
    unet = reference[0]
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([40, 700])
    caught = _hooked_full_forward(loaded, unet, x_t, t, loaded.null_text.expand(2, -1, -1))
    assert loaded.num_blocks == 25 and sorted(caught) == list(range(1, 26))
    with torch.no_grad():
        for b in range(1, 26):  # each block alone: the walk stops right after it
            torch.testing.assert_close(loaded.features(x_t, t, [b])[b], caught[b], rtol=1e-5, atol=1e-5)
        together = loaded.features(x_t, t, [15, 18, 4])
    assert sorted(together) == [4, 15, 18]
    shapes = loaded.block_shapes(64)
    assert {b: tuple(m.shape[1:3]) for b, m in caught.items()} == {b: (c, s) for b, (c, s) in shapes.items()}


def test_nothing_after_the_deepest_block_runs(loaded):
    calls = []
    names = [loaded.block_module_name(b) for b in range(1, 26)]
    handles = [loaded.unet.get_submodule(n).register_forward_hook(lambda *_, b=b: calls.append(b))
               for b, n in enumerate(names, start=1)]
    handles.append(loaded.unet.conv_out.register_forward_hook(lambda *_: calls.append("out")))
    try:
        with torch.no_grad():
            loaded.features(torch.randn(1, 4, 8, 8), torch.tensor([10]), [13, 6])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == list(range(1, 14))


def test_learnable_conditioning_gets_gradients_and_the_frozen_unet_none(loaded):
    for p in loaded.parameters():
        p.requires_grad_(False)
    cond = torch.nn.Parameter(loaded.null_text.clone())
    out = loaded.features(torch.randn(2, 4, 8, 8), torch.tensor([100, 100]), [18], cond=cond)[18]
    out.square().mean().backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    assert all(p.grad is None for p in loaded.parameters())
    with torch.no_grad():  # a different conditioning changes the features
        moved = loaded.features(torch.zeros(1, 4, 8, 8), torch.tensor([100]), [18], cond=cond + 1)[18]
        null = loaded.features(torch.zeros(1, 4, 8, 8), torch.tensor([100]), [18])[18]
    assert not torch.allclose(moved, null)


def test_single_file_loads_the_same_weights(tiny_folder, loaded, tmp_path):
    path = save_single_file(tiny_folder, tmp_path / "tiny.safetensors")
    from_file = create_backbone("sd-tiny", checkpoint=str(path))
    x_t, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    with torch.no_grad():
        a, b = loaded.features(x_t, t, [18])[18], from_file.features(x_t, t, [18])[18]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    family = family_of("sd-tiny")
    assert family.backbone_id("sd-tiny", str(path)) != family.backbone_id("sd-tiny", str(tiny_folder))
    assert family.backbone_id("sd-tiny", str(tiny_folder)).startswith("sd-tiny-")
    assert len(family.backbone_id("sd-tiny", str(tiny_folder))) == len("sd-tiny-") + 12


def test_nothing_is_fetched_and_bad_paths_are_one_line(tiny_folder, tmp_path):
    with pytest.raises(CheckpointError, match="hub name and diffrep never downloads"):
        create_backbone("sd15", checkpoint="runwayml/stable-diffusion-v1-5")
    with pytest.raises(CheckpointError, match="does not exist: pass a diffusers folder"):
        create_backbone("sd15", checkpoint=str(tmp_path / "nowhere"))
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="has no unet/"):
        create_backbone("sd-tiny", checkpoint=str(tmp_path / "half"))
    with pytest.raises(CheckpointError, match="does not fit sd15: unet block_out_channels .*pass --config sd-tiny"):
        create_backbone("sd15", checkpoint=str(tiny_folder))
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    result = CliRunner().invoke(main, ["info", "--config", "sd15", "--checkpoint", "org/model"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output


def test_random_weights_are_a_pure_function_of_the_seed():
    a, b = create_backbone("sd-tiny", weight_seed=5), create_backbone("sd-tiny", weight_seed=5)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(a.features(x, torch.tensor([9]), [20])[20], b.features(x, torch.tensor([9]), [20])[20])


def test_sd15_layout_numbers_like_adm():
    shapes = family_of("sd15").block_shapes("sd15", 512)
    assert len(shapes) == 25 and shapes[13] == (1280, 8) and shapes[18] == (1280, 16) and shapes[1] == (320, 64)
    assert family_of("sd15").block_shapes("sd15", 256)[18] == (1280, 8)
    assert family_of("sd15").mirror_block("sd15", 14) == 12
    assert family_of("sd21-base").block_shapes("sd21-base", 512) == shapes


def test_info_prints_the_block_table_at_two_sizes():
    result = CliRunner().invoke(main, ["info", "--config", "sd-tiny"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "@64" in lines[1] and "@32" in lines[1] and "GFLOPs@32" in lines[1]
    assert lines[2].split()[:2] == ["1", "conv_in"] and lines[26].split()[:2] == ["25", "up_blocks.3.attentions.2"]
