"""Noise schedules and q_sample against the official coefficients."""

import numpy as np
import pytest
import torch

from extract.errors import ConfigError, TimestepRangeError
from extract.schedule import get_schedule

from .reference import reference_path

COEFFICIENTS = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
]


@pytest.fixture(scope="module")
def sched():
    return np.load(reference_path("adm_small.npz"))


@pytest.mark.parametrize("name", COEFFICIENTS)
def test_linear_schedule_coefficients(sched, name):
    ours = getattr(get_schedule("linear", 1000), name)
    np.testing.assert_allclose(ours, sched[f"sched/{name}"], rtol=1e-12, atol=1e-15)


def test_cosine_betas(sched):
    np.testing.assert_allclose(get_schedule("cosine", 1000).betas, sched["sched/cosine_betas"], rtol=1e-12, atol=1e-15)


def test_q_sample_matches(sched):
    x0, noise, t = (torch.from_numpy(sched[f"sched/{k}"]) for k in ("x0", "noise", "t"))
    out = get_schedule("linear").q_sample(x0, t, noise)
    np.testing.assert_allclose(out.numpy(), sched["sched/q_sample"], rtol=1e-6, atol=1e-7)


def test_timestep_out_of_range_names_the_range():
    with pytest.raises(TimestepRangeError, match=r"timestep 1000 is out of range .* 0\.\.999"):
        get_schedule("linear").check_timesteps([5, 1000])


def test_unknown_schedule():
    with pytest.raises(ConfigError, match="linear or cosine"):
        get_schedule("sigmoid")
