"""Fusion of diffusion features across blocks and timesteps: DifFormer on the cache, DifFeed through the live backbone.

- ``fusion.difformer``: ``DifFormer``, one transformer shared across timesteps over the tokens of
  several cached (b, t) arrays; a head like the others, trained from the cache (``diffrep fuse``).
- ``fusion.diffeed``: ``DifFeed``, decoder features fed back into the encoder for a second pass on
  the same x_t; it needs the backbone during training (``diffrep feedback``).
- ``fusion.pass1_cache``: DifFeed's first pass read from the feature cache when it holds it.

Importing ``fusion`` registers its heads (``difformer``) in ``probe.heads.HEADS``: whoever needs the
full head registry imports ``fusion``.
"""

from fusion.difformer import DifFormer

__all__ = ["DifFormer"]
