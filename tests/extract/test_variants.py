"""Class-conditional models, the new attention order and the classifier, held to the same exactness.

No golden is given for them, so each is tied to the golden-checked legacy U-Net by an identity
that holds only if the variant is implemented right.
"""

import numpy as np
import torch

from extract.backbone.adm import create_classifier, create_model

from .reference import load_golden

FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=2, channel_mult="1,2,2", attention_resolutions="16,8",
             num_head_channels=8, resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True)


def _golden_state():
    golden, flags = load_golden("adm_small_unitscale.npz")
    state = {k[3:]: torch.from_numpy(golden[k]) for k in golden.files if k.startswith("sd/")}
    return golden, flags, state


def test_new_attention_order_equals_legacy_with_permuted_qkv():
    golden, flags, state = _golden_state()
    new = create_model(**{**flags, "use_new_attention_order": True}).eval()
    permuted = dict(state)
    for name, module in new.named_modules():
        if type(module).__name__ != "AttentionBlock":
            continue
        heads, channels = module.num_heads, module.channels
        ch = channels // heads
        # legacy rows: (head, {q,k,v}, c); new rows: ({q,k,v}, head, c)
        order = torch.arange(3 * channels).reshape(heads, 3, ch).permute(1, 0, 2).reshape(-1)
        for suffix in ("weight", "bias"):
            key = f"{name}.qkv.{suffix}"
            permuted[key] = state[key][order]
    new.load_state_dict(permuted, strict=True)
    with torch.no_grad():
        out = new(torch.from_numpy(golden["x_t"]), torch.from_numpy(golden["timesteps"]))
    np.testing.assert_allclose(out.numpy(), golden["out"], rtol=1e-4, atol=1e-5)


def test_class_conditional_adds_the_label_embedding_to_the_time_embedding():
    golden, flags, state = _golden_state()
    cond = create_model(**{**flags, "class_cond": True}).eval()
    label_emb = torch.randn(1000, 128, generator=torch.Generator().manual_seed(0))
    cond.load_state_dict({**state, "label_emb.weight": label_emb}, strict=True)
    y = torch.tensor([7, 7])
    shifted = create_model(**flags).eval()
    shifted.load_state_dict({**state, "time_embed.2.bias": state["time_embed.2.bias"] + label_emb[7]}, strict=True)
    x, t = torch.from_numpy(golden["x_t"]), torch.from_numpy(golden["timesteps"])
    with torch.no_grad():
        a, b = cond(x, t, y), shifted(x, t)
        feats = cond.features(x, t, [6], cond=y)
        expected = shifted.features(x, t, [6])[6]
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats[6].numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)  # cond is the label
    assert not np.allclose(a.numpy(), golden["out"], atol=1e-3), "the label must change the output"
    assert feats[6].shape == (2, 64, 16, 16)


def test_classifier_encoder_blocks_equal_the_unet_encoder():
    golden, _, state = _golden_state()
    clf = create_classifier(image_size=32, classifier_width=32, classifier_depth=2, channel_mult="1,2,2",
                            classifier_attention_resolutions="16,8", num_head_channels=8).eval()
    shared = {k: v for k, v in state.items() if k.split(".")[0] in ("time_embed", "input_blocks", "middle_block")}
    missing = clf.load_state_dict(shared, strict=False).missing_keys
    assert all(k.startswith("out.") for k in missing)
    with torch.no_grad():
        feats = clf.features(torch.from_numpy(golden["x_t"]), torch.from_numpy(golden["timesteps"]), range(1, 11))
    for b in range(1, 11):
        np.testing.assert_allclose(feats[b].numpy(), golden[f"block/{b}"], rtol=1e-4, atol=1e-5, err_msg=f"block {b}")


def test_classifier_attention_pool_equals_a_direct_computation():
    torch.manual_seed(0)
    clf = create_classifier(image_size=32, classifier_width=32, classifier_depth=1, channel_mult="1,2",
                            classifier_attention_resolutions="16", num_head_channels=16).eval()
    for p in clf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 400])
    with torch.no_grad():
        logits = clf(x, t)
        h = clf.features(x, t, [clf.num_blocks])[clf.num_blocks]
        h = clf.out[1](clf.out[0](h))
        pool = clf.out[2]
        tokens = h.flatten(2)
        tokens = torch.cat([tokens.mean(-1, keepdim=True), tokens], -1) + pool.positional_embedding
        qkv = torch.nn.functional.conv1d(tokens, pool.qkv_proj.weight, pool.qkv_proj.bias)
        c, heads = tokens.shape[1], pool.num_heads
        q, k, v = (z.reshape(2, heads, c // heads, -1) for z in qkv.chunk(3, dim=1))
        att = torch.softmax(torch.einsum("bhcq,bhck->bhqk", q, k) / (c // heads) ** 0.5, dim=-1)
        mixed = torch.einsum("bhqk,bhck->bhcq", att, v).reshape(2, c, -1)
        expected = torch.nn.functional.conv1d(mixed, pool.c_proj.weight, pool.c_proj.bias)[:, :, 0]
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
