"""Noise schedules (linear, cosine, and Stable Diffusion's scaled-linear) and ``q_sample``, in float64 as guided-diffusion computes them."""

from __future__ import annotations

import math

import numpy as np
import torch

from extract.errors import ConfigError, TimestepRangeError

__all__ = ["NoiseSchedule", "get_schedule", "linear_betas", "cosine_betas", "scaled_linear_betas"]


def linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al.'s linear schedule, rescaled so any T spans the same range as T=1000."""
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def scaled_linear_betas(num_steps: int, start: float = 0.00085, end: float = 0.012) -> np.ndarray:
    """Stable Diffusion's schedule (diffusers' ``scaled_linear``): betas linear in their square root."""
    return np.linspace(start ** 0.5, end ** 0.5, num_steps, dtype=np.float64) ** 2


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: betas from alpha_bar(t) = cos^2((t + s)/(1 + s) pi/2)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=np.float64,
    )


class NoiseSchedule:
    """The forward-process coefficients of one schedule (float64 numpy arrays of length T)."""

    def __init__(self, betas: np.ndarray, name: str = "custom"):
        self.name = name
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_steps = len(self.betas)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self._on_device: dict[tuple[int, str], torch.Tensor] = {}

    def check_timesteps(self, timesteps) -> list[int]:
        """Raises TimestepRangeError naming the valid range for any t outside 0..T-1."""
        values = [int(t) for t in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
        for t in values:
            if not 0 <= t < self.num_steps:
                raise TimestepRangeError(
                    f"timestep {t} is out of range for the {self.name} schedule: valid timesteps are 0..{self.num_steps - 1}"
                )
        return values

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; coefficients cast to float32 first.

        Args:
            x0: (N, C, H, W) clean images in [-1, 1]. noise: like x0, on x0's device.
            t: (N,) integer timesteps, or one int for the whole batch: its coefficients are moved to
                x0's device once and kept, so a loop on a GPU never waits for a copy (the values and
                the result are the same bits as with (N,) timesteps).
        """
        shape = (-1,) + (1,) * (x0.ndim - 1)
        if not torch.is_tensor(t):
            a, s = self._coefficients(int(t), x0.device)
            return a * x0 + s * noise
        self.check_timesteps(t)
        idx = t.to("cpu").long()
        a = torch.from_numpy(self.sqrt_alphas_cumprod)[idx].float().to(x0.device)
        s = torch.from_numpy(self.sqrt_one_minus_alphas_cumprod)[idx].float().to(x0.device)
        return a.view(shape) * x0 + s.view(shape) * noise

    def _coefficients(self, t: int, device: torch.device) -> torch.Tensor:
        """(2,) float32 [sqrt(abar_t), sqrt(1 - abar_t)] on ``device``, copied there once per (t, device)."""
        key = (t, str(device))
        if key not in self._on_device:
            self.check_timesteps([t])
            pair = np.array([self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]])
            self._on_device[key] = torch.from_numpy(pair).float().to(device)
        return self._on_device[key]


def get_schedule(name: str, num_steps: int = 1000) -> NoiseSchedule:
    """``linear``, ``cosine`` or ``scaled_linear`` (Stable Diffusion's) schedule with T = num_steps."""
    if name == "linear":
        return NoiseSchedule(linear_betas(num_steps), "linear")
    if name == "cosine":
        return NoiseSchedule(cosine_betas(num_steps), "cosine")
    if name == "scaled_linear":
        return NoiseSchedule(scaled_linear_betas(num_steps), "scaled_linear")
    raise ConfigError(f"noise schedule {name!r} is unknown: choose linear or cosine, or scaled_linear for Stable Diffusion")
