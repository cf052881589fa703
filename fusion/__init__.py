"""Fusion of diffusion features (DifFormer on cached (b, t) sets, DifFeed on the live backbone): not built yet."""
