"""Pooling to min(native, pool) in float16, and exact derivation of coarser pools from stored maps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extract.errors import CacheError
from extract.pooling import derive_pool, pool_features, pooled_size


def test_pooled_size_is_min_of_native_and_pool():
    assert pooled_size(32, 16) == 16
    assert pooled_size(8, 16) == 8
    assert pooled_size(32, 0) == 32


def test_pool_features_is_adaptive_average_in_float16():
    x = torch.randn(3, 5, 32, 32)
    out = pool_features(x, 4)
    assert out.dtype == torch.float16 and out.shape == (3, 5, 4, 4)
    assert torch.equal(out, F.adaptive_avg_pool2d(x, 4).half())
    assert torch.equal(pool_features(x, 0), x.half()), "pool 0 keeps the full map"
    assert pool_features(x[:, :, :8, :8], 16).shape[-1] == 8, "never upsampled"


@pytest.mark.parametrize("target", [1, 2, 4, 8])
def test_coarser_pool_derives_exactly_from_stored(target):
    native = torch.randn(2, 3, 32, 32)
    stored = pool_features(native, 16).numpy()
    derived = derive_pool(stored, native=32, pool=target)
    again = F.adaptive_avg_pool2d(torch.from_numpy(stored).float(), target).half().numpy()
    assert derived.dtype == np.float16 and derived.shape == (2, 3, target, target)
    np.testing.assert_array_equal(derived, again)
    direct = pool_features(native, target).numpy().astype(np.float32)
    np.testing.assert_allclose(derived.astype(np.float32), direct, atol=2e-3), "only float16 rounding apart"


def test_pool_larger_than_native_is_the_stored_map():
    stored = np.ones((1, 2, 8, 8), np.float16)
    assert derive_pool(stored, native=8, pool=16) is stored
    assert derive_pool(stored, native=8, pool=None) is stored


def test_finer_than_stored_and_non_divisors_are_refused():
    stored = np.zeros((1, 2, 16, 16), np.float16)
    with pytest.raises(CacheError, match="needs 32x32 maps but the cache stores 16x16"):
        derive_pool(stored, native=64, pool=32)
    with pytest.raises(CacheError, match="re-extract with --pool none"):
        derive_pool(stored, native=64, pool=0)
    with pytest.raises(CacheError, match="cannot be derived exactly .* choose one of 1, 2, 4, 8, 16"):
        derive_pool(stored, native=64, pool=6)
