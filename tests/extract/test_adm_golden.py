"""The ADM U-Net against the official implementation's numbers (../shared/reference goldens)."""

import numpy as np
import pytest
import torch

from extract.backbone.adm import create_model
from extract.backbone.adm_layers import timestep_embedding

from .reference import GOLDEN_FILES, load_golden

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module", params=GOLDEN_FILES)
def golden_model(request):
    golden, flags = load_golden(request.param)
    model = create_model(**flags).eval()
    state = {k[3:]: torch.from_numpy(golden[k]) for k in golden.files if k.startswith("sd/")}
    model.load_state_dict(state, strict=True)
    return golden, model


def test_every_block_matches_the_official_outputs(golden_model):
    golden, model = golden_model
    x_t, t = torch.from_numpy(golden["x_t"]), torch.from_numpy(golden["timesteps"])
    with torch.no_grad():
        feats = model.features(x_t, t, range(1, model.num_blocks + 1))
    assert sorted(feats) == list(range(1, 20))
    for b in range(1, 20):
        np.testing.assert_allclose(feats[b].numpy(), golden[f"block/{b}"], rtol=RTOL, atol=ATOL, err_msg=f"block {b}")


def test_final_output_matches(golden_model):
    golden, model = golden_model
    with torch.no_grad():
        out = model(torch.from_numpy(golden["x_t"]), torch.from_numpy(golden["timesteps"]))
    assert out.shape == (2, 6, 32, 32)
    np.testing.assert_allclose(out.numpy(), golden["out"], rtol=RTOL, atol=ATOL)


def test_timestep_embeddings_match(golden_model):
    golden, model = golden_model
    t = torch.from_numpy(golden["timesteps"])
    sinusoidal = timestep_embedding(t, model.model_channels)
    np.testing.assert_allclose(sinusoidal.numpy(), golden["emb/sinusoidal"], rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        embedded = model.time_embed(sinusoidal)
    np.testing.assert_allclose(embedded.numpy(), golden["emb/time_embed"], rtol=RTOL, atol=ATOL)


def test_truncated_features_equal_the_full_forward_blocks(golden_model):
    """A walk stopped at b=12 gives the same b=4 and b=12 as the full golden run."""
    golden, model = golden_model
    with torch.no_grad():
        feats = model.features(torch.from_numpy(golden["x_t"]), torch.from_numpy(golden["timesteps"]), [12, 4])
    assert sorted(feats) == [4, 12]
    np.testing.assert_allclose(feats[12].numpy(), golden["block/12"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(feats[4].numpy(), golden["block/4"], rtol=RTOL, atol=ATOL)
