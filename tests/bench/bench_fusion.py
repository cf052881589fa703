"""``python -m tests.bench fusion``: DifFeed training steps with truncated passes against both passes in full.

The official code runs both DifFeed passes through the whole U-Net and takes the features it
needs with hooks; diffrep stops pass 1 after the deepest feedback source and pass 2 after the
read-out block. Same model, batch, weights and inputs; only ``DifFeed.full_passes`` differs.
The FLOP ideal of the forwards alone is (2 x full) / (to the deepest source + to the read-out):
1.70x on 256x256_uncond at read-out 24; the backward pass (from the read-out into the earliest
feedback target, through frozen weights) is the same work in both and lowers the ideal.
"""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F


def _flop_ideal(config: str, model) -> tuple[float, float]:
    """(forwards-only ideal, ideal with a 1x-forward backward from the read-out to the first target)."""
    from extract.backbone.block_table import block_table

    cum = {r.b: r.flops_cum for r in block_table(config)}
    full, deepest, readout = cum[0], cum[max(model.sources)], cum[model.readout]
    first = min(target for _, target in model.pairs)
    backward = readout - cum[first - 1] if first > 1 else readout
    return 2 * full / (deepest + readout), (2 * full + backward) / (deepest + readout + backward)


def bench_fusion(configs=None, strategy: str = "bottleneck") -> list[str]:
    """Training images/s of DifFeed (feedback layers + a small attention head learning, backbone frozen).

    ``configs``: (configuration, batch, timed steps) triples. CPU: float32, 32x32_small at batch 16
    and 256x256_uncond at batch 1 (about a minute a step); CUDA: bf16, 256x256_uncond at batch 64.
    """
    from extract.precision import autocast
    from extract.backbone.registry import create_backbone
    from fusion.diffeed import DifFeed
    from probe.heads import create_head

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16" if cuda else "fp32"
    if configs is None:
        configs = (("256x256_uncond", 64, 5),) if cuda else (("32x32_small", 16, 3), ("256x256_uncond", 1, 1))
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"fusion: DifFeed ({strategy}) training steps, truncated passes vs both passes in full (the official way), "
             f"{precision}, {where}"]
    for config, batch, steps in configs:
        torch.manual_seed(0)
        backbone = create_backbone(config, weight_seed=0)
        shape = backbone.block_shapes()
        probe = DifFeed(backbone, torch.nn.Identity(), strategy)
        head = create_head("attention", {(probe.readout, 150): (shape[probe.readout][0], *[shape[probe.readout][1]] * 2)},
                           10, dim=64, depth=1, token_pool=4)
        model = DifFeed(backbone, head, strategy, precision=precision).to(device)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        size = backbone.image_size
        x = {(0, 150): torch.randn(batch, 3, size, size, device=device)}
        y = torch.randint(0, 10, (batch,), device=device)

        def step():
            with autocast(device, precision):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        rates = {}
        for full in (False, True):
            model.full_passes = full
            step()  # warm-up
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize()
            rates[full] = batch * steps / (time.perf_counter() - start)
        forwards, with_backward = _flop_ideal(config, model)
        lines.append(
            f"  {config:15s} batch {batch:3d}, read-out b={model.readout}, sources {','.join(map(str, model.sources))}: "
            f"truncated {rates[False]:8.3g} images/s, full passes {rates[True]:8.3g} images/s: "
            f"{rates[False] / rates[True]:.2f}x (FLOP ideal {forwards:.2f}x forwards only, {with_backward:.2f}x with the backward)")
    return lines


if __name__ == "__main__":
    print("\n".join(bench_fusion()))
