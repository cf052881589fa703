"""Random weights for a backbone without a checkpoint, chosen so that every block does real work.

ADM's own initialisation zeroes the last convolution of every residual branch and every attention
output projection, so a freshly built U-Net is almost an identity map: the middle block returns
its input unchanged and block features are little more than projected pixels. Random-weight runs
(tests, benchmarks, the demo) use fan-in scaled normal weights for every tensor instead (the
recipe of the reference golden ``adm_small_unitscale.npz``), drawn from a private generator so
the global RNG is untouched and the weights are a pure function of the seed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from extract.backbone.adm_layers import AttentionPool2d

__all__ = ["init_random_weights"]


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter of ``model`` in place, deterministically from ``seed``.

    GroupNorm weight 1 + 0.1 n and bias 0.1 n; embeddings n; the attention pool's positional
    embedding n / sqrt(channels); other weights of 2+ dims n / sqrt(fan-in); other 1-D tensors 0.1 n,
    with n standard normal. Returns the model.
    """
    generator = torch.Generator().manual_seed(int(seed))
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            n = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if isinstance(module, nn.GroupNorm):
                value = 1 + 0.1 * n if name == "weight" else 0.1 * n
            elif isinstance(module, nn.Embedding):
                value = n
            elif isinstance(module, AttentionPool2d) and name == "positional_embedding":
                value = n / math.sqrt(param.shape[0])
            elif param.ndim >= 2:
                value = n / math.sqrt(math.prod(param.shape[1:]))
            else:
                value = 0.1 * n
            param.copy_(value.to(param.dtype))
    return model
