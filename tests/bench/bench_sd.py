"""``make bench EXTRA=sd``: Stable Diffusion's truncated forwards against its full U-Net, next to the FLOP table.

SD 1.5's real U-Net (random weights: speed does not depend on them) at 256 px on this machine's
CPU, batch 1, float32: wall seconds of the full forward and of ``features`` stopping after b = 15,
18 and both, as ratios against the full forward and against the block table's cumulative-FLOP share.
Also the VAE encoder's cost per image (FLOPs counted on the meta device), which extraction adds
once per image and timestep, and, on a CUDA machine, bf16 images/s at 512 px.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.bench.main import _time


def vae_encoder_flops(config: str, image_size: int) -> int:
    """FLOPs of the VAE encoder (and quant conv) for one image, counted on the meta device."""
    from extract.backbone.sd_configs import get_sd_config
    from extract.backbone.sd_family import offline_libraries

    diffusers, _ = offline_libraries()
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**get_sd_config(config).vae).eval()
        x = torch.empty(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vae.quant_conv(vae.encoder(x))
    return counter.get_total_flops()


def bench_sd(config: str = "sd15", image_size: int = 256, blocks=(15, 18), repeats: int = 2) -> list[str]:
    from extract.backbone.registry import create_backbone, family_of

    family = family_of(config)
    table = {r.b: r.flops_cum for r in family.block_table(config, image_size=image_size)}
    torch.manual_seed(0)
    model = create_backbone(config, weight_seed=0)
    side = image_size // 8
    x, t = torch.randn(1, 4, side, side), torch.tensor([100])
    lines = [f"sd: {config} U-Net (random weights) at {image_size} px (latent {side}x{side}), batch 1, float32, "
             f"{torch.get_num_threads()} threads, median of {repeats} after a warm-up"]
    with torch.inference_mode():
        full = _time(lambda: model(x, t), repeats)
        lines.append(f"  full forward                 {full:8.2f} s   ratio 1.000   (FLOP share 1.000, "
                     f"{table[0] / 1e9:.1f} GFLOPs)")
        for b in blocks:
            sec = _time(lambda: model.features(x, t, [b]), repeats)
            lines.append(f"  truncated after b={b:<2}        {sec:8.2f} s   ratio {sec / full:.3f}   "
                         f"(FLOP share {table[b] / table[0]:.3f})")
        sec = _time(lambda: model.features(x, t, list(blocks)), repeats)
        lines.append(f"  one pass capturing b={','.join(map(str, blocks))}    {sec:8.2f} s   ratio {sec / full:.3f}   "
                     f"(FLOP share {table[max(blocks)] / table[0]:.3f})")
        pixels = torch.rand(1, 3, image_size, image_size) * 2 - 1
        enc = _time(lambda: model.encode(pixels), repeats)
    vae = vae_encoder_flops(config, image_size)
    lines.append(f"  VAE encoder (once per image)      {enc:5.2f} s   ({vae / 1e9:.1f} GFLOPs = "
                 f"{vae / table[max(blocks)]:.2f}x the U-Net up to b={max(blocks)})")
    if torch.cuda.is_available():
        lines += _gpu(model, config, blocks, family)
    return lines


def _gpu(model, config, blocks, family, batch: int = 32, repeats: int = 5) -> list[str]:
    from extract.precision import autocast

    model = model.cuda()
    lines = []
    for size in (512, 256):
        side = size // 8
        model.image_size = size
        x = torch.randn(batch, 4, side, side, device="cuda")
        pixels = torch.rand(batch, 3, size, size, device="cuda") * 2 - 1
        t = torch.full((batch,), 100, device="cuda", dtype=torch.long)
        with torch.inference_mode(), autocast(torch.device("cuda"), "bf16"):
            for name, fn in (("U-Net to b=%d" % max(blocks), lambda: model.features(x, t, list(blocks))),
                             ("VAE encoder", lambda: model.encode(pixels)), ("full U-Net", lambda: model(x, t))):
                fn()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(repeats):
                    fn()
                torch.cuda.synchronize()
                rate = batch * repeats / (time.perf_counter() - start)
                lines.append(f"  gpu {torch.cuda.get_device_name()}, bf16, {size} px, batch {batch}: {name} "
                             f"{rate:8.1f} images/s")
    return lines
