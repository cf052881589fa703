"""guided-diffusion's training loss for eps-prediction: the simple MSE, plus the variational bound term when sigma is learned.

For models that learn their variance the loss is the "hybrid" objective: the VLB term trains the
variance only (the predicted mean is a stop-gradient), in bits per dimension, with the
discretised Gaussian log-likelihood of 8-bit images at t = 0, as the official code computes it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from extract.schedule import NoiseSchedule

__all__ = ["diffusion_loss"]


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of 8-bit images in [-1, 1] under a Gaussian discretised to bins of width 2/255."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _gather(array: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = torch.from_numpy(array)[t.cpu()].float().to(like.device)
    return values.view((-1,) + (1,) * (like.ndim - 1))


def diffusion_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, learn_sigma: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """guided-diffusion's training loss for eps-prediction: MSE, plus the VLB term when sigma is learned.

    Args:
        model: the U-Net. schedule: its noise schedule. x0: (N, 3, H, W) images in [-1, 1].
        t: (N,) int64 timesteps. noise: like x0. learn_sigma: the model outputs (eps, v) with 6 channels.

    Returns:
        (scalar loss, ``{"mse": (N,), "vb": (N,)}`` per-image terms; vb is zero without learned sigma).
    """
    x_t = schedule.q_sample(x0, t, noise)
    output = model(x_t, t).float()
    if not learn_sigma:
        mse = _mean_flat((noise - output) ** 2)
        return mse.mean(), {"mse": mse.detach(), "vb": torch.zeros_like(mse)}
    eps, var_values = output.split(x0.shape[1], dim=1)
    mse = _mean_flat((noise - eps) ** 2)
    # the VLB term learns the variance only: the mean is taken as fixed (stop-gradient), as the official code does
    eps = eps.detach()
    min_log = _gather(schedule.posterior_log_variance_clipped, t, x0)
    max_log = _gather(np.log(schedule.betas), t, x0)
    frac = (var_values + 1) / 2
    model_log_variance = frac * max_log + (1 - frac) * min_log
    pred_x0 = _gather(np.sqrt(1.0 / schedule.alphas_cumprod), t, x0) * x_t \
        - _gather(np.sqrt(1.0 / schedule.alphas_cumprod - 1), t, x0) * eps
    coef1 = _gather(schedule.posterior_mean_coef1, t, x0)
    coef2 = _gather(schedule.posterior_mean_coef2, t, x0)
    model_mean = coef1 * pred_x0 + coef2 * x_t
    true_mean = coef1 * x0 + coef2 * x_t
    true_log_variance = _gather(schedule.posterior_log_variance_clipped, t, x0)
    kl = _mean_flat(_normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
    nll = -_mean_flat(_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return (mse + vb).mean(), {"mse": mse.detach(), "vb": vb.detach()}
