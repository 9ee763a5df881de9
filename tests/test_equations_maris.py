"""MARIS, equation by equation: each numbered equation and architectural statement of the paper
(Methodology; Tab. 2-4 for the ablation rows) re-stated directly (loops over heads, pixels and
words, functional convolutions) on small random inputs and compared with the module, or checked
through a property it implies (a mask that must block, a residual that must pass the input
through). Mutual-Aware Attention itself (Eq. 3-5) is re-stated in tests/test_maris.py; here it
enters the whole-model re-statement through the same loop.

Small shapes throughout: a 32 px tiny model (4 x 4 feature grid), D = 16, 2 heads.
"""

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import maris
from common.encoders.sam import SAM_ARCHS

ATOL = 1e-5


def small_config(**changes) -> maris.MARISConfig:
    """The tiny config at 32 px (a 4 x 4 grid of 64-channel SAM features), D = 16, 2 heads, and
    the paper's tau 0.5 (so that Eq. 4 masks some pairs at random weights)."""
    small = dict(image_size=32, dim=16, heads=2, up_dims=(8, 4), tau=0.5, freeze_encoders=True)
    return dataclasses.replace(maris.CONFIGS["tiny"], **{**small, **changes})


def build(**changes) -> maris.MARIS:
    """A small MARIS in eval mode, every BatchNorm with random statistics and affine parameters
    (so that a re-statement that skipped one would differ), and a query token F_m as large as the
    features."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = maris.MARIS(small_config(**changes))
    randomise_batchnorms(model)
    if hasattr(model, "query"):
        with torch.no_grad():
            model.query.normal_(generator=torch.Generator().manual_seed(2))
    return model.eval()


def randomise_batchnorms(module: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen))


@pytest.fixture(scope="module")
def full() -> maris.MARIS:
    return build()


def inputs(model: maris.MARIS, seed: int = 0, B: int = 2, L: int = 5):
    """Cached-feature inputs: SAM's F_v1..F_v3 (B, h, w, C), CLIP's F_l (B, L, C'), and a
    text mask whose second sample has two padded words."""
    gen = torch.Generator().manual_seed(seed)
    side = model.cfg.image_size // model.image_encoder.patch_size
    C, C_l = model.image_encoder.dim, model.text_encoder.out_dim
    image_feats = {k: torch.randn(B, side, side, C, generator=gen)
                   for k in ("f_v1", "f_v2", "f_v3")}
    text_feats = {"f_l": torch.randn(B, L, C_l, generator=gen)}
    text_mask = torch.ones(B, L, dtype=torch.bool)
    text_mask[1, L - 2:] = False
    text = torch.randint(1, 100, (B, L), generator=gen) * text_mask
    return dict(image=None, text=text, text_mask=text_mask, image_feats=image_feats,
                text_feats=text_feats)


def forward(model, seed: int = 0, **extra) -> dict:
    with torch.no_grad():
        return model(**inputs(model, seed), **extra)


# ----------------------------------------------------------------------------------------------
# Re-statements of the blocks, written from the paper without the module's code paths


def linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def mlp(x, module, act):
    """MLP(x): linear, activation, linear (the two-layer MLPs of Eq. 1-2 and of the query)."""
    first, last = module.net[0], module.net[-1]
    assert len(module.net) == 3
    return linear(act(linear(x, first)), last)


def cba(x, seq):
    """CBA(x) (Eq. 1): 3x3 convolution, batch normalisation (eval statistics), GELU."""
    conv, bn = seq[0], seq[1]
    y = F.conv2d(x, conv.weight, conv.bias, padding=1)
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    return F.gelu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


def channels_first(x):  # (B, h, w, C) -> (B, C, h, w)
    return x.permute(0, 3, 1, 2)


def eq1(fe, f_v1, f_v2):
    """Eq. (1): F^ = CBA([MLP(F_v1), MLP(F_v2)]), shallow and middle features."""
    return cba(torch.cat([channels_first(mlp(f_v1, fe.mlp_v1, F.gelu)),
                          channels_first(mlp(f_v2, fe.mlp_v2, F.gelu))], 1), fe.cba1)


def eq2(fe, f_hat, f_v3):
    """Eq. (2): F_v = CBA([MLP(F^), MLP(F_v3)]), the early enhanced and the deep feature."""
    return cba(torch.cat([channels_first(mlp(f_hat.permute(0, 2, 3, 1), fe.mlp_hat, F.gelu)),
                          channels_first(mlp(f_v3, fe.mlp_v3, F.gelu))], 1), fe.cba2)


def eq3_to_5(block, f_v, f_l, text_mask, tau):
    """Eq. (3)-(5) with the paper's text's mask (Eq. 4: pairs of relevance below tau, and padded
    words, masked) and Language-Guided Attention as a softmax over pixels; loops over pixels and
    words. Returns F_lav, F_val, A."""
    lav, val, attns = [], [], []
    for b in range(f_v.shape[0]):
        z_v, z_l = linear(f_v[b], block.w_v), linear(f_l[b], block.w_l)
        n, l = z_v.shape[0], z_l.shape[0]
        s = z_v @ z_l.T
        keep = [[1 / (1 + math.exp(-s[i, j].item())) >= tau and bool(text_mask[b, j])
                 for j in range(l)] for i in range(n)]
        a, a_t = torch.zeros(n, l), torch.zeros(n, l)
        for i in range(n):
            js = [j for j in range(l) if keep[i][j]]
            if js:
                a[i, js] = torch.softmax(s[i, js], 0)
        for j in range(l):
            is_ = [i for i in range(n) if keep[i][j]]
            if is_:
                a_t[is_, j] = torch.softmax(s[is_, j], 0)
        lav.append(block.norm_v(a @ z_l + z_v))
        val.append(block.norm_l(a_t.T @ z_v + z_l))
        attns.append(a)
    return torch.stack(lav), torch.stack(val), torch.stack(attns)


def attention(att, q_in, kv_in, key_mask=None):
    """Multi-head attention (Vaswani et al. 2017), one query, head and key at a time: for each
    head, softmax over the allowed keys of q.k / sqrt(head size), then the weighted values."""
    B, N, D = q_in.shape
    M, heads = kv_in.shape[1], att.heads
    hs = D // heads
    q, k, v = linear(q_in, att.to_q), linear(kv_in, att.to_k), linear(kv_in, att.to_v)
    out = torch.zeros(B, N, D)
    for b in range(B):
        js = [j for j in range(M) if key_mask is None or bool(key_mask[b, j])]
        for h in range(heads):
            sl = slice(h * hs, (h + 1) * hs)
            for i in range(N):
                scores = torch.stack([q[b, i, sl] @ k[b, j, sl] for j in js]) / math.sqrt(hs)
                weights = torch.softmax(scores, 0)
                out[b, i, sl] = sum(w * v[b, j, sl] for w, j in zip(weights, js))
    return linear(out, att.to_out)


def decoder_block(blk, f_lav, f_c, c_mask):
    """Eq. (6)-(8), and SAM's token-to-image attention where the "w/ TOI-A" row adds it."""
    f_lav_hat = attention(blk.self_attn_v, f_lav, f_lav) + f_lav  # Eq. (6)
    f_c_hat = attention(blk.self_attn_c, f_c, f_c, c_mask) + f_c  # Eq. (7)
    if blk.token_to_image is not None:  # Tab. 4 #9: tokens read the pixels, after Eq. 7
        f_c_hat = attention(blk.token_to_image, f_c_hat, f_lav_hat) + f_c_hat
    f_lav_bar = attention(blk.cross_attn, f_lav_hat, f_c_hat, c_mask) + f_lav_hat  # Eq. (8)
    return f_lav_bar, f_c_hat


def upsample_block(x, seq):
    """One of the "two sequential blocks, each a convolutional layer and an upsample
    operation": CBA, then 2x bilinear."""
    return F.interpolate(cba(x, seq), scale_factor=2, mode="bilinear", align_corners=False)


def decode(model, f_lav, f_val, text_mask, h, w, elp=True):
    """The Mask Decoder (Sec. Mask Decoder): F_c = [F_m, F_val] (or, "w/o ELP", F_lav times the
    mean real word and F_c = [F_m]), the decoder blocks, the upsampled F̄_lav dotted with
    MLP(F̂_m). Returns the (B, 1, 4h, 4w) mask logits and the last F̂_c."""
    B, N, D = f_lav.shape
    f_m = model.query.reshape(1, 1, D).expand(B, 1, D)  # the single multi-modal query token
    if elp:
        f_c = torch.cat([f_m, f_val], 1)
        c_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool), text_mask], 1)
    else:
        mean_word = torch.stack([f_val[b, text_mask[b]].mean(0) for b in range(B)])
        f_lav, f_c, c_mask = f_lav * mean_word[:, None], f_m, torch.ones(B, 1, dtype=torch.bool)
    for blk in model.decoder:  # the next block takes F̄_lav and F̂_c
        f_lav, f_c = decoder_block(blk, f_lav, f_c, c_mask)
    grid = torch.stack([torch.stack([f_lav[:, r * w + c] for c in range(w)], -1)
                        for r in range(h)], -2)  # pixel n = (row, column), row-major: (B, D, h, w)
    vis = upsample_block(upsample_block(grid, model.upsample[0]), model.upsample[1])
    query = mlp(f_c[:, 0], model.query_mlp, F.relu)  # MLP(F̂_m): F̂_m is the first token
    return (query[:, :, None, None] * vis).sum(1, keepdim=True), f_c


def focal(logits, target, alpha=0.25, gamma=2.0):
    """Focal loss (Lin et al. 2017), mean over pixels: -alpha_t (1 - p_t)^gamma log p_t."""
    p = torch.sigmoid(logits)
    p_t = torch.where(target > 0, p, 1 - p)
    alpha_t = torch.where(target > 0, torch.tensor(alpha), torch.tensor(1 - alpha))
    return (-alpha_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()


def dice(logits, target, eps=1.0):
    """Dice loss (Milletari et al. 2016), per sample then averaged."""
    p = torch.sigmoid(logits)
    per = [1 - (2 * (p[b] * target[b]).sum() + eps) / (p[b].sum() + target[b].sum() + eps)
           for b in range(p.shape[0])]
    return torch.stack(per).mean()


def maris_forward(model, image_feats, f_l, text_mask):
    """Fig. 3 re-stated: Eq. 1-2, the flattened F_v, two MA blocks (Eq. 3-5), the decoder."""
    cfg = model.cfg
    f_hat = eq1(model.enhance, image_feats["f_v1"], image_feats["f_v2"])
    f_v = eq2(model.enhance, f_hat, image_feats["f_v3"])  # (B, D, h, w)
    B, D, h, w = f_v.shape
    vis = torch.stack([f_v[:, :, r, c] for r in range(h) for c in range(w)], 1)  # (B, N, D)
    words = f_l
    for block in model.mutual:
        vis, words, attn = eq3_to_5(block, vis, words, text_mask, cfg.tau)
    logits, _ = decode(model, vis, words, text_mask, h, w)
    size = (cfg.image_size, cfg.image_size)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False), attn


# ----------------------------------------------------------------------------------------------
# Image encoder (Sec. Image Encoder and Text Encoder)


@pytest.mark.parametrize("config", list(maris.CONFIGS))
def test_image_encoder_features_are_the_2nd_to_4th_global_attention_blocks(config):
    """"We utilize visual features from 2nd~4th global attention blocks" as F_v1, F_v2, F_v3:
    every config, and the blocks' indexes for ViT-H, ViT-B and the tiny SAM."""
    cfg = maris.CONFIGS[config]
    globals_ = SAM_ARCHS[cfg.sam_arch]["global_attn_indexes"]
    assert cfg.global_blocks == (1, 2, 3)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = maris.MARIS(dataclasses.replace(cfg, freeze_encoders=True))
    assert model.image_encoder.out_indexes == list(globals_[1:4])
    assert {"vit_h": [15, 23, 31], "vit_b": [5, 8, 11], "tiny": [3, 4, 5]}[cfg.sam_arch] == (
        model.image_encoder.out_indexes)


def test_image_encoder_gives_shallow_middle_deep_in_order(full):
    """encode_image's F_v1, F_v2, F_v3 are the outputs of SAM's 2nd, 3rd and 4th global blocks,
    run block by block from the patch embedding."""
    torch.manual_seed(0)
    image = torch.randn(1, 3, 32, 32)
    enc = full.image_encoder
    second_to_fourth = SAM_ARCHS["tiny"]["global_attn_indexes"][1:4]
    x, outs = enc.patch_embed(image) + enc.pos_embed, []
    with torch.no_grad():
        for i, blk in enumerate(enc.blocks):
            x = blk(x)
            if i in second_to_fourth:
                outs.append(x)
        feats = full.encode_image(image)
    assert len(outs) == 3
    for key, want in zip(("f_v1", "f_v2", "f_v3"), outs):
        assert torch.allclose(feats[key], want, atol=ATOL), key


# ----------------------------------------------------------------------------------------------
# Feature Enhancement (Eq. 1-2)


def test_eq1_early_enhanced_feature_is_cba_of_shallow_and_middle(full):
    fe = full.enhance
    f = inputs(full)["image_feats"]
    seen = {}
    hook = fe.cba1.register_forward_hook(lambda m, a, out: seen.__setitem__("f_hat", out))
    with torch.no_grad():
        fe(f["f_v1"], f["f_v2"], f["f_v3"])
        hook.remove()
        assert torch.allclose(seen["f_hat"], eq1(fe, f["f_v1"], f["f_v2"]), atol=ATOL)


def test_eq1_does_not_read_the_deep_feature(full):
    """The deep feature enters only in Eq. 2: F^ is the same whatever F_v3 is."""
    fe = full.enhance
    f = inputs(full)["image_feats"]
    seen = []
    hook = fe.cba1.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        fe(f["f_v1"], f["f_v2"], f["f_v3"])
        fe(f["f_v1"], f["f_v2"], torch.randn_like(f["f_v3"]))
        changed = fe(f["f_v1"], torch.randn_like(f["f_v2"]), f["f_v3"])
        base = fe(f["f_v1"], f["f_v2"], f["f_v3"])
    hook.remove()
    assert torch.equal(seen[0], seen[1])
    assert not torch.allclose(seen[0], seen[2])  # ... but reads the middle one
    assert not torch.allclose(changed, base)


def test_eq2_enhanced_feature_is_cba_of_early_enhanced_and_deep(full):
    fe = full.enhance
    f = inputs(full)["image_feats"]
    with torch.no_grad():
        want = eq2(fe, eq1(fe, f["f_v1"], f["f_v2"]), f["f_v3"])
        got = fe(f["f_v1"], f["f_v2"], f["f_v3"])
    assert got.shape == (2, 16, 4, 4) and torch.allclose(got, want, atol=ATOL)


def test_eq1_eq2_blocks_are_mlp_gelu_and_conv3x3_bn_gelu(full):
    """CBA: "convolution layers with 3x3 kernels, a batch-normalization layer, and GeLu"; the
    MLPs of Eq. 1-2 two linear layers with GELU between them."""
    fe = full.enhance
    for seq in (fe.cba1, fe.cba2):
        conv, bn, act = seq
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        assert conv.in_channels == 2 * conv.out_channels == 2 * full.cfg.dim
        assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(act, torch.nn.GELU)
    for m in (fe.mlp_v1, fe.mlp_v2, fe.mlp_v3, fe.mlp_hat):
        assert isinstance(m.net[1], torch.nn.GELU) and m.net[-1].out_features == full.cfg.dim


# ----------------------------------------------------------------------------------------------
# Mutual-Aware Attention (Eq. 3-5): two sequential blocks on F_v and F_l


def test_eq3_to_5_two_sequential_blocks_read_enhanced_pixels_and_words(full):
    """"Two sequential Mutual-Aware Attention blocks": the first reads the flattened F_v (row-
    major pixels) and F_l, the second the first's F_lav and F_val; A is the last block's."""
    assert len(full.mutual) == 2
    x = inputs(full)
    seen = []
    hook = full.decoder[0].self_attn_v.register_forward_hook(
        lambda m, a, out: seen.append(a[0]))  # F_lav entering Eq. 6
    out = forward(full)
    hook.remove()
    f = x["image_feats"]
    with torch.no_grad():
        f_v = full.enhance(f["f_v1"], f["f_v2"], f["f_v3"])
        vis = torch.stack([f_v[:, :, r, c] for r in range(4) for c in range(4)], 1)
        lav1, val1, _ = eq3_to_5(full.mutual[0], vis, x["text_feats"]["f_l"], x["text_mask"],
                                 full.cfg.tau)
        lav2, _, attn2 = eq3_to_5(full.mutual[1], lav1, val1, x["text_mask"], full.cfg.tau)
    assert torch.allclose(seen[0], lav2, atol=ATOL)
    assert torch.allclose(out["attn"], attn2, atol=ATOL)
    assert all(block.tau == full.cfg.tau == 0.5 for block in full.mutual)


# ----------------------------------------------------------------------------------------------
# Mask Decoder (Eq. 6-8)


def block_inputs(D=16, B=2, N=6, L=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f_lav, f_c = torch.randn(B, N, D, generator=gen), torch.randn(B, 1 + L, D, generator=gen)
    c_mask = torch.ones(B, 1 + L, dtype=torch.bool)
    c_mask[1, -2:] = False  # two padded words in the second sample
    return f_lav, f_c, c_mask


@pytest.mark.parametrize("toi", [False, True], ids=["ours", "w/ TOI-A"])
def test_eq6_to_8_decoder_block_matches_the_equations(toi):
    torch.manual_seed(0)
    blk = maris.DecoderBlock(16, 2, toi_attention=toi)
    f_lav, f_c, c_mask = block_inputs()
    with torch.no_grad():
        got_lav, got_c = blk(f_lav, f_c, c_mask)
        want_lav, want_c = decoder_block(blk, f_lav, f_c, c_mask)
    assert torch.allclose(got_lav, want_lav, atol=ATOL)
    assert torch.allclose(got_c, want_c, atol=ATOL)


def test_eq6_to_8_residuals_pass_the_inputs_through():
    """With every attention's output projection zero, Eq. 6-8 are the identity: each adds its
    input back."""
    torch.manual_seed(0)
    blk = maris.DecoderBlock(16, 2, toi_attention=True)
    for att in (blk.self_attn_v, blk.self_attn_c, blk.cross_attn, blk.token_to_image):
        torch.nn.init.zeros_(att.to_out.weight)
        torch.nn.init.zeros_(att.to_out.bias)
    f_lav, f_c, c_mask = block_inputs()
    with torch.no_grad():
        got_lav, got_c = blk(f_lav, f_c, c_mask)
    assert torch.equal(got_lav, f_lav) and torch.equal(got_c, f_c)


def test_eq7_eq8_padded_words_are_masked():
    """Padded words take part in neither Eq. 7's self-attention nor Eq. 8's cross-attention:
    whatever they hold, F̄_lav and the real tokens of F̂_c do not change."""
    torch.manual_seed(0)
    blk = maris.DecoderBlock(16, 2)
    f_lav, f_c, c_mask = block_inputs()
    garbage = f_c.clone()
    garbage[~c_mask] = 1e2 * torch.randn(int((~c_mask).sum()), 16)
    with torch.no_grad():
        lav_a, c_a = blk(f_lav, f_c, c_mask)
        lav_b, c_b = blk(f_lav, garbage, c_mask)
    assert torch.allclose(lav_a, lav_b, atol=ATOL)
    assert torch.allclose(c_a[c_mask], c_b[c_mask], atol=ATOL)


def test_eq8_pixels_read_the_words_not_each_other():
    """Eq. 8 is cross-attention from F̂_lav to F̂_c: with Eq. 6 and 7 silenced, changing one
    pixel leaves every other pixel's F̄_lav unchanged, and changing a real word changes them."""
    torch.manual_seed(0)
    blk = maris.DecoderBlock(16, 2)
    for att in (blk.self_attn_v, blk.self_attn_c):
        torch.nn.init.zeros_(att.to_out.weight)
        torch.nn.init.zeros_(att.to_out.bias)
    f_lav, f_c, c_mask = block_inputs()
    moved, word = f_lav.clone(), f_c.clone()
    moved[:, 0] += 5.0
    word[:, 1] += 5.0
    with torch.no_grad():
        base, _ = blk(f_lav, f_c, c_mask)
        one_pixel, _ = blk(moved, f_c, c_mask)
        one_word, _ = blk(f_lav, word, c_mask)
    assert torch.allclose(base[:, 1:], one_pixel[:, 1:], atol=ATOL)
    assert not torch.allclose(base, one_word, atol=1e-3)


def test_eq7_query_token_is_first_of_f_c_and_its_mlp_gives_the_mask(full):
    """F_c = [F_m, F_val] with F_m the learned query (never padding), the blocks chained, F̄_lav
    upsampled by two conv + 2x blocks, and the mask MLP(F̂_m) . upsampled F̄_lav (Sec. Mask
    Decoder), F̂_m read from the first token of the last F̂_c."""
    gen = torch.Generator().manual_seed(3)
    f_lav, f_val = torch.randn(2, 16, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    text_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        got = full.decode(f_lav, f_val, text_mask, 4, 4)
        want, _ = decode(full, f_lav, f_val, text_mask, 4, 4)
    assert got.shape == (2, 1, 16, 16) and torch.allclose(got, want, atol=ATOL)
    assert len(full.decoder) == 2 and len(full.upsample) == 2


def test_upsampling_blocks_are_conv_bn_gelu_then_2x_bilinear(full):
    for seq in full.upsample:
        conv, bn, act, up = seq
        assert conv.kernel_size == (3, 3) and isinstance(bn, torch.nn.BatchNorm2d)
        assert isinstance(act, torch.nn.GELU) and up.scale_factor == 2 and up.mode == "bilinear"
    assert [s[0].out_channels for s in full.upsample] == list(full.cfg.up_dims)
    assert full.query_mlp.net[-1].out_features == full.cfg.up_dims[-1]


# ----------------------------------------------------------------------------------------------
# The whole model (Fig. 3) and its loss (Eq. 9)


def test_fig3_forward_is_eq1_to_8_in_sequence(full):
    x = inputs(full)
    with torch.no_grad():
        want, attn = maris_forward(full, x["image_feats"], x["text_feats"]["f_l"], x["text_mask"])
    out = forward(full)
    assert out["mask_logits"].shape == (2, 1, 32, 32)
    assert torch.allclose(out["mask_logits"], want, atol=1e-4)
    assert torch.allclose(out["attn"], attn, atol=ATOL)


def test_eq9_loss_is_focal_plus_dice(full):
    gen = torch.Generator().manual_seed(0)
    target = (torch.rand(2, 1, 32, 32, generator=gen) > 0.7).float()
    out = forward(full, target=target)
    logits = out["mask_logits"]
    assert torch.allclose(out["loss_focal"], focal(logits, target), atol=1e-6)
    assert torch.allclose(out["loss_dice"], dice(logits, target), atol=1e-6)
    assert torch.allclose(out["loss"], focal(logits, target) + dice(logits, target), atol=1e-6)
    assert {k for k in out if k.startswith("loss")} == {"loss", "loss_focal", "loss_dice"}


# ----------------------------------------------------------------------------------------------
# The ablation rows (Tab. 2-4): each computes what its docstring says, and not the full model


def test_tab2_without_fe_projects_the_deep_feature_alone():
    """"w/o FE": F_v = F_v3 W (C -> D) enters the first MA block."""
    model = build(**maris.ABLATIONS["w/o FE"])
    x = inputs(model)
    seen = []
    hook = model.mutual[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    forward(model)
    hook.remove()
    f_v3 = x["image_feats"]["f_v3"]
    want = linear(f_v3, model.project_v3).reshape(2, 16, 16)  # pixels row-major
    assert torch.allclose(seen[0], want, atol=ATOL)


def test_tab2_without_ma_the_decoder_reads_f_v_and_projected_words(monkeypatch):
    """"w/o MA": F_lav = F_v (Eq. 1-2, flattened), F_val = F_l W (C' -> D)."""
    model = build(**maris.ABLATIONS["w/o MA"])
    x = inputs(model)
    seen = {}
    real_decode = model.decode
    monkeypatch.setattr(model, "decode", lambda *a: seen.setdefault("args", a) and real_decode(*a))
    out = forward(model)
    f = x["image_feats"]
    f_lav, f_val, text_mask, h, w = seen["args"]
    with torch.no_grad():
        f_v = eq2(model.enhance, eq1(model.enhance, f["f_v1"], f["f_v2"]), f["f_v3"])
        want_lav = torch.stack([f_v[:, :, r, c] for r in range(4) for c in range(4)], 1)
        want_val = linear(x["text_feats"]["f_l"], model.project_l)
    assert (h, w) == (4, 4) and torch.equal(text_mask, x["text_mask"])
    assert torch.allclose(f_lav, want_lav, atol=ATOL) and torch.allclose(f_val, want_val, atol=ATOL)
    assert "attn" not in out


def test_tab2_without_de_is_sams_decoder_on_the_real_words():
    """"w/o DE": SAM's MaskDecoder with F_lav as the image embedding and SAM's position
    encoding, each sample's real words of F_val its sparse prompts, no dense prompt, and the
    single-mask output (mask token 0)."""
    model = build(**maris.ABLATIONS["w/o DE"])
    sam = model.sam_decoder
    gen = torch.Generator().manual_seed(0)
    f_lav, f_val = torch.randn(2, 16, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    text_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        got = sam(f_lav, f_val, text_mask, 4, 4)
        want = []
        for b in range(2):
            image = torch.stack([torch.stack([f_lav[b, r * 4 + c] for c in range(4)], -1)
                                 for r in range(4)], -2)[None]  # (1, D, h, w)
            masks, _ = sam.decoder.predict_masks(
                image_embeddings=image, image_pe=sam.pe((4, 4))[None],
                sparse_prompt_embeddings=f_val[b, text_mask[b]][None],
                dense_prompt_embeddings=torch.zeros(1, 16, 1, 1))
            want.append(masks[:, :1])
    assert got.shape == (2, 1, 16, 16) and torch.allclose(got, torch.cat(want), atol=ATOL)


def test_tab2_without_de_is_sams_decoder_as_build_sam_builds_it():
    """SAM's MaskDecoder (3 multimask outputs + 1 single-mask token, an IoU head of depth 3 and
    width D) over a TwoWayTransformer (depth 2, MLP 8 x D); only the IoU head and the three
    multimask hypernetworks, which no loss sees, are frozen."""
    model = build(**maris.ABLATIONS["w/o DE"])
    sam, D = model.sam_decoder, model.cfg.dim
    dec = sam.decoder
    assert dec.transformer_dim == D and dec.num_multimask_outputs == 3 and dec.num_mask_tokens == 4
    iou = dec.iou_prediction_head
    assert iou.num_layers == 3 and [layer.out_features for layer in iou.layers] == [D, D, 4]
    t = dec.transformer
    assert t.depth == len(t.layers) == 2 and t.embedding_dim == D
    assert t.num_heads == model.cfg.heads and t.layers[0].mlp.lin1.out_features == 8 * D
    frozen = {n for n, p in sam.named_parameters() if not p.requires_grad}
    unseen = ("decoder.iou_prediction_head.",
              *(f"decoder.output_hypernetworks_mlps.{i}." for i in (1, 2, 3)))
    assert frozen == {n for n, _ in sam.named_parameters() if n.startswith(unseen)}
    assert frozen and any(n.startswith("decoder.output_hypernetworks_mlps.0.")
                          for n, p in sam.named_parameters() if p.requires_grad)


def test_tab4_without_elp_multiplies_the_mean_word_in_and_keeps_a_constant_query():
    """"w/o ELP": F_lav times F_val's mean real word, F_c = [F_m] alone; F_m attends only to
    itself, so F̂_m is the same learned constant for every sample."""
    model = build(**maris.ABLATIONS["w/o ELP"])
    gen = torch.Generator().manual_seed(3)
    f_lav, f_val = torch.randn(2, 16, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    text_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        got = model.decode(f_lav, f_val, text_mask, 4, 4)
        want, f_c = decode(model, f_lav, f_val, text_mask, 4, 4, elp=False)
    assert torch.allclose(got, want, atol=ATOL)
    assert f_c.shape == (2, 1, 16) and torch.allclose(f_c[0], f_c[1])


# rows whose model shares the full model's parameters, or adds its own: with the full model's
# parameters loaded wherever the names agree, every row must change the mask logits
ROWS = [row for row in maris.ABLATIONS if row != "Ours"]


@pytest.mark.parametrize("row", ROWS)
def test_tab2_to_4_every_ablation_row_computes_something_else(row, full):
    model = build(**maris.ABLATIONS[row])
    missing, unexpected = model.load_state_dict(full.state_dict(), strict=False)
    assert (not missing) == (row in ("w/o attn. mask", "w/o ELP")), missing
    a, b = forward(full)["mask_logits"], forward(model)["mask_logits"]
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-4), row
