"""MMNet's numbered equations and architectural statements, each re-stated directly (loops,
explicit formulas) on small random inputs and compared with the module, or checked through a
property the equation implies. Eq. 1, 7-10, 12, 14 and 16's loop tests are in test_mmnet.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build, make_batch

import mmnet
from common.layers import sine_pos_1d, sine_pos_2d

C = 8  # model width of the block-level tests


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics (at initialisation eval-mode BN is the identity, which
    would hide a misplaced norm) and biases, eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.3
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean = torch.randn(m.running_mean.shape, generator=g) * 0.3
            m.running_var = torch.rand(m.running_var.shape, generator=g) + 0.5
    return module.eval()


def sigma_map(block: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """sigma(F W) on a map, written out: convolution, BatchNorm in eval mode, ReLU."""
    conv, bn, _ = block
    y = F.conv2d(x, conv.weight, None, padding=conv.padding)
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    return F.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


def capture_inputs(module: torch.nn.Module, store: dict, key: str):
    return module.register_forward_hook(lambda m, i, o: store.__setitem__(key, i))


def neck_inputs(side: int = 4, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f_v2 = torch.randn(batch, C, 2 * side, 2 * side, generator=g)
    f_v3 = torch.randn(batch, C, side, side, generator=g)
    f_v4 = torch.randn(batch, C, side // 2, side // 2, generator=g)
    return f_v2, f_v3, f_v4


def up2(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# Fusion Neck (Sec. 3.1, Eq. 2-5) and the dense visual features (Eq. 6)
# ---------------------------------------------------------------------------------------------


def run_neck(neck, f_v2, f_v3, f_v4, f_tg=None):
    seen = {}
    hooks = [capture_inputs(neck.w_m4, seen, "f_m4"), capture_inputs(neck.w_m3, seen, "f_m3"),
             capture_inputs(neck.aggregate, seen, "cat4"),
             capture_inputs(neck.coord_conv, seen, "cat5")]
    with torch.no_grad():
        out = neck(f_v2, f_v3, f_v4, f_tg)
    for h in hooks:
        h.remove()
    return out, {k: v[0] for k, v in seen.items()}


def test_eq2_fm4_is_the_upsampled_elementwise_product_of_visual_and_textual_relus():
    torch.manual_seed(0)
    neck = randomise(mmnet.FusionNeck(C, text_dim=6))
    f_v2, f_v3, f_v4 = neck_inputs()
    f_tg = torch.randn(2, 6)
    _, seen = run_neck(neck, f_v2, f_v3, f_v4, f_tg)
    lin = neck.w_tg[0]
    text = F.relu(f_tg @ lin.weight.T + lin.bias)  # sigma(F_tg W_tg), (B, C)
    vis = sigma_map(neck.w_v4, f_v4)  # sigma(F_v4 W_v4), (B, C, h/2, w/2)
    product = torch.empty_like(vis)
    for b in range(2):
        for c in range(C):
            product[b, c] = vis[b, c] * text[b, c]  # element-wise, channel by channel
    assert torch.allclose(seen["f_m4"], up2(product, f_v3.shape[-2:]), atol=1e-5)


def test_eq3_fm3_and_fm2_concatenate_relu_maps_with_2x2_average_pooled_fv2():
    torch.manual_seed(0)
    neck = randomise(mmnet.FusionNeck(C, text_dim=6))
    f_v2, f_v3, f_v4 = neck_inputs()
    _, seen = run_neck(neck, f_v2, f_v3, f_v4, torch.randn(2, 6))
    f_m3 = torch.cat([sigma_map(neck.w_m4, seen["f_m4"]), sigma_map(neck.w_v3, f_v3)], 1)
    assert torch.allclose(seen["f_m3"], f_m3, atol=1e-5)
    h, w = f_v3.shape[-2:]
    avg = torch.empty(2, C, h, w)  # Avg: 2x2 average pooling with stride 2, written out
    for i in range(h):
        for j in range(w):
            avg[:, :, i, j] = f_v2[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((-1, -2))
    f_m2 = torch.cat([sigma_map(neck.w_m3, f_m3), sigma_map(neck.w_v2, avg)], 1)
    assert torch.allclose(seen["cat4"][:, :2 * C], f_m2, atol=1e-5)


def test_eq4_concatenates_fm2_fm3_fm4_in_that_order_then_a_1x1_conv():
    torch.manual_seed(0)
    neck = randomise(mmnet.FusionNeck(C, text_dim=6))
    f_v2, f_v3, f_v4 = neck_inputs()
    _, seen = run_neck(neck, f_v2, f_v3, f_v4, torch.randn(2, 6))
    cat = seen["cat4"]
    assert cat.shape[1] == 5 * C and neck.aggregate[0].kernel_size == (1, 1)
    assert torch.equal(cat[:, 2 * C:4 * C], seen["f_m3"])  # F_m3 second
    assert torch.equal(cat[:, 4 * C:], seen["f_m4"])  # F_m4 last (F_m2 first: Eq. 3's test)
    f_m = sigma_map(neck.aggregate, cat)
    assert torch.allclose(seen["cat5"][:, :C], f_m, atol=1e-5)


def test_eq5_concatenates_the_normalised_xy_coordinates_then_a_3x3_conv():
    torch.manual_seed(0)
    neck = randomise(mmnet.FusionNeck(C, text_dim=6))
    f_v2, f_v3, f_v4 = neck_inputs(side=4)
    f_v3 = torch.randn(2, C, 4, 6)  # a non-square grid tells x from y
    f_v2, f_v4 = torch.randn(2, C, 8, 12), torch.randn(2, C, 2, 3)
    out, seen = run_neck(neck, f_v2, f_v3, f_v4, torch.randn(2, 6))
    coords = seen["cat5"][:, C:]
    assert coords.shape == (2, 2, 4, 6)
    for i in range(4):
        for j in range(6):  # x = -1 .. 1 left to right, y = -1 .. 1 top to bottom
            assert torch.allclose(coords[:, 0, i, j], torch.tensor(-1 + 2 * j / 5))
            assert torch.allclose(coords[:, 1, i, j], torch.tensor(-1 + 2 * i / 3))
    assert neck.coord_conv[0].kernel_size == (3, 3)
    assert torch.allclose(out, sigma_map(neck.coord_conv, seen["cat5"]), atol=1e-5)


def test_eq6_dense_features_are_the_necks_steps_without_the_textual_product():
    """F'_m4 = Up(sigma(F_v4 W'_v4)): no F_tg, new weights, otherwise Eq. 3-5."""
    torch.manual_seed(0)
    gen = mmnet.MultiQueryGenerator(C, 6, 3, num_pixels=16)
    dense = randomise(gen.dense)
    assert dense.w_tg is None
    f_v2, f_v3, f_v4 = neck_inputs()
    out, seen = run_neck(dense, f_v2, f_v3, f_v4)
    assert torch.allclose(seen["f_m4"], up2(sigma_map(dense.w_v4, f_v4), (4, 4)), atol=1e-5)
    assert out.shape == f_v3.shape
    # and the model's F_vd reads F_v2..F_v4, not the neck's F_vt: F_tg does not reach it
    model = build("mmnet").eval()
    batch = make_batch(model, n=1)
    seen = {}
    model.generator.to_queries.register_forward_hook(lambda m, i, o: seen.update(f_vd=o))
    with torch.no_grad():
        model(**model.inputs_from(batch))
        first = seen["f_vd"].clone()
        model.neck.w_tg[0].weight.mul_(3.0)  # a different F_tg path
        model(**model.inputs_from(batch))
    assert torch.equal(first, seen["f_vd"])


def test_eq7_three_conv_layers_reduce_to_nq_maps_flattened_row_major():
    torch.manual_seed(0)
    Q, side = 3, 4
    gen = randomise(mmnet.MultiQueryGenerator(C, 6, Q, num_pixels=side * side))
    convs = [m for m in gen.to_queries.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3), (1, 1)]
    assert convs[-1].out_channels == Q
    seen = {}
    gen.w_vd.register_forward_hook(lambda m, i, o: seen.update(f_vd=i[0]))
    f_v2, f_v3, f_v4 = neck_inputs(side)
    with torch.no_grad():
        gen(f_v2, f_v3, f_v4, torch.randn(2, C), torch.randn(2, 5, 6), torch.ones(2, 5, dtype=bool))
        maps = gen.to_queries(gen.dense(f_v2, f_v3, f_v4))  # (B, Q, h, w)
    for n in range(Q):
        for i in range(side):
            for j in range(side):
                assert seen["f_vd"][:, n, i * side + j].equal(maps[:, n, i, j])


# ---------------------------------------------------------------------------------------------
# Multi-Query Generator (Sec. 3.2, Eq. 8-10): properties (the loop test is in test_mmnet.py)
# ---------------------------------------------------------------------------------------------


def test_eq9_softmax_is_over_the_words_and_padded_words_get_no_attention():
    torch.manual_seed(0)
    gen = randomise(mmnet.MultiQueryGenerator(C, 6, 4, num_pixels=16))
    f_v2, f_v3, f_v4 = neck_inputs()
    words = torch.randn(2, 5, 6)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    f_vg = torch.randn(2, C)
    with torch.no_grad():
        f_q, attn = gen(f_v2, f_v3, f_v4, f_vg, words, text_mask)
        words2 = words.clone()
        words2[:, 2:] = torch.randn(2, 3, 6) * 10  # changes sample 0's words, sample 1's padding
        f_q2, attn2 = gen(f_v2, f_v3, f_v4, f_vg, words2, text_mask)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4))  # A_n: a distribution over words
    assert (attn[1, :, 2:] == 0).all()
    assert torch.allclose(attn[1], attn2[1]) and torch.allclose(f_q[1], f_q2[1], atol=1e-6)
    assert not torch.allclose(attn[0], attn2[0])


def test_eq9_word_attentions_start_apart():
    """The He initialisation of Eq. 8-10's token maps (Interpretations): at initialisation the
    queries attend to the words differently, not all uniformly (train-mode BatchNorm)."""
    model = build("mmnet").train()
    batch = make_batch(model, n=2)
    with torch.no_grad():
        attn = model(**model.inputs_from(batch))["word_attn"]  # (B, Q, L)
    tv = (attn[:, :, None] - attn[:, None]).abs().sum(-1) / 2  # total variation between queries
    Q = attn.shape[1]
    assert tv.sum((1, 2)).min() / (Q * (Q - 1)) > 0.1
    for name in ("w_t", "w_vg", "w_vd", "w_a", "w_tv"):
        lin = getattr(model.generator, name)[0]
        assert (lin.bias == 0).all()
        assert 0.7 < lin.weight.std().item() * math.sqrt(lin.in_features / 2) < 1.3  # He


# ---------------------------------------------------------------------------------------------
# Vision-Language Decoder (Sec. 3.3, Eq. 11-13) and its positional encodings
# ---------------------------------------------------------------------------------------------


def mha(attn, q_in, k_in, v_in, heads):
    """Eq. (12) written out: softmax(Q K^T / sqrt(d_k)) V per head, then the output map."""
    q, k, v = attn.to_q(q_in), attn.to_k(k_in), attn.to_v(v_in)
    d = q.shape[-1] // heads
    out = torch.empty_like(q)
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        out[..., s] = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(d), -1) \
            @ v[..., s]
    return attn.to_out(out)


def test_eq11_to_13_pre_norm_layer_with_residuals_and_positional_encodings():
    torch.manual_seed(0)
    heads = 2
    layer = randomise(mmnet.DecoderLayer(C, heads, ffn_dim=16, dropout=0.1))
    vis, queries = torch.randn(2, 6, C), torch.randn(2, 3, C)
    vis_pos, query_pos = torch.randn(6, C), torch.randn(3, C)
    with torch.no_grad():
        out = layer(vis, queries, vis_pos, query_pos)
        v = layer.norm1(vis)  # Eq. (11): F'_vt = MHA(LN(F_vt)) + F_vt, position on Q and K
        f_vt = mha(layer.self_attn, v + vis_pos, v + vis_pos, v, heads) + vis
        v = layer.norm2(f_vt)  # Eq. (13): F'_s = MHCA(LN(F'_vt), F_q) + F'_vt
        f_s = mha(layer.cross_attn, v + vis_pos, queries + query_pos, queries, heads) + f_vt
        ref = layer.mlp(layer.norm3(f_s)) + f_s  # F_s = MLP(LN(F'_s)) + F'_s
    assert torch.allclose(out, ref, atol=1e-5)


def test_decoder_takes_sine_encodings_and_the_generated_queries_then_a_final_layernorm():
    """Sec. 3.3: F_vt with 2-D sine encodings, F_q with 1-D ones over the query index; every
    layer reads the generated F_q (Eq. 11-13 update only F_vt); Eq. 14-15 read it too."""
    model = randomise(build("mmnet"))
    batch = make_batch(model, n=2)
    seen = {"layers": []}
    for layer in model.decoder:
        layer.register_forward_hook(lambda m, i, o: seen["layers"].append((i, o)))
    model.generator.register_forward_hook(lambda m, i, o: seen.update(f_q=o[0]))
    model.neck.register_forward_hook(lambda m, i, o: seen.update(f_vt=o))
    capture_inputs(model.projector, seen, "projector")
    capture_inputs(model.estimator, seen, "estimator")
    with torch.no_grad():
        model(**model.inputs_from(batch))
    B, Cm, h, w = seen["f_vt"].shape
    Q = model.cfg.num_queries
    (first_in, _), (_, last_out) = seen["layers"][0], seen["layers"][-1]
    assert torch.equal(first_in[0], seen["f_vt"].flatten(2).transpose(1, 2))  # Flatten, Eq. 5
    for inputs, _ in seen["layers"]:
        assert torch.equal(inputs[1], seen["f_q"])
        assert torch.allclose(inputs[2], sine_pos_2d(h, w, Cm))
        assert torch.allclose(inputs[3], sine_pos_1d(Q, Cm))
    f_s = model.decoder_norm(last_out).transpose(1, 2).unflatten(2, (h, w))
    assert torch.allclose(seen["projector"][0], f_s, atol=1e-6)
    assert torch.equal(seen["projector"][1], seen["f_q"])
    assert torch.equal(seen["estimator"][0], seen["f_q"])


def test_sine_encodings_are_fixed_sin_cos_pairs():
    """DETR's 2-D and the Transformer's 1-D sine encodings, one entry written out."""
    h, w, dim = 3, 4, 8
    pos = sine_pos_2d(h, w, dim)
    i, j, k = 2, 3, 1  # row, column, frequency index
    freq = 10000 ** (k / (dim // 4))
    assert math.isclose(pos[i * w + j, k], math.sin(i / freq), abs_tol=1e-6)  # y, sin
    assert math.isclose(pos[i * w + j, dim // 4 + k], math.cos(i / freq), abs_tol=1e-6)
    assert math.isclose(pos[i * w + j, dim // 2 + k], math.sin(j / freq), abs_tol=1e-6)  # x
    p1 = sine_pos_1d(5, dim)
    assert math.isclose(p1[4, 1], math.sin(4 / 10000 ** (1 / 4)), abs_tol=1e-6)
    assert math.isclose(p1[4, 5], math.cos(4 / 10000 ** (1 / 4)), abs_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Mask Decoder (Sec. 3.4, Eq. 14-16) and the loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_relu", [False, True])
def test_eq14_fp_is_up_conv_up_to_half_the_width(kernel_relu):
    torch.manual_seed(0)
    proj = randomise(mmnet.MultiMaskProjector(C, kernel_relu=kernel_relu))
    f_s = torch.randn(2, C, 3, 4)
    conv, bn = proj.vis[1], proj.vis[2]
    with torch.no_grad():
        x = F.interpolate(f_s, scale_factor=2, mode="bilinear")
        x = bn(F.conv2d(x, conv.weight, padding=1))
        x = x if kernel_relu else F.relu(x)  # the ReLU goes with Eq. 14's sigma (Interpretations)
        ref = F.interpolate(x, scale_factor=2, mode="bilinear")
        assert torch.allclose(proj.vis(f_s), ref, atol=1e-5)
    assert conv.kernel_size == (3, 3) and conv.out_channels == C // 2
    assert proj.w_p.out_features == 9 * (C // 2) + 1


def test_eq15_scores_are_a_softmax_over_queries_of_the_residual_mhsa():
    torch.manual_seed(0)
    heads, Q = 2, 5
    est = mmnet.MultiQueryEstimator(C, heads).eval()
    f_q = torch.randn(2, Q, C)
    with torch.no_grad():
        scores = est(f_q)
        x = mha(est.attn, f_q, f_q, f_q, heads) + f_q  # MHSA with its residual
        logits = torch.stack([x[:, n] @ est.w_s.weight[0] for n in range(Q)], 1)  # W_s, (B, Q)
        ref = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)  # over the queries
        assert torch.allclose(scores, ref, atol=1e-6)
        perm = torch.randperm(Q)  # no position in the estimator: permuting queries permutes S_q
        assert torch.allclose(est(f_q[:, perm]), scores[:, perm], atol=1e-6)
    assert est.w_s.bias is None  # a bias shared by all queries cancels in the softmax


def test_eq16_mix_masks_is_the_logit_of_the_weighted_sum_of_probabilities():
    torch.manual_seed(0)
    masks = torch.randn(2, 4, 3, 3) * 3
    weights = torch.softmax(torch.randn(2, 4), 1)
    y = torch.zeros(2, 1, 3, 3)
    for n in range(4):
        y[:, 0] += weights[:, n, None, None] * torch.sigmoid(masks[:, n])
    assert torch.allclose(mmnet.mix_masks(masks, weights), torch.log(y / (1 - y)), atol=1e-5)
    # one query with all the weight: its own mask; saturated logits stay finite and ordered
    one_hot = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]])
    assert torch.allclose(mmnet.mix_masks(masks, one_hot)[:, 0], masks[[0, 1], [0, 2]], atol=1e-5)
    big = torch.tensor([60.0, 80.0, -70.0])[None, :, None, None].expand(1, 3, 1, 1)
    out = mmnet.mix_masks(big, torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.isfinite(out).all() and out.item() > 50


def test_loss_is_bce_on_the_upsampled_prediction_and_the_only_term():
    model = build("mmnet").eval()
    batch = make_batch(model, n=2)
    with torch.no_grad():
        out = model(**model.inputs_from(batch), target=batch["mask"])
    logits, target = out["mask_logits"], batch["mask"]
    p = torch.sigmoid(logits)
    ref = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    assert torch.allclose(out["loss"], ref, atol=1e-5) and torch.equal(out["loss"], out["loss_bce"])
    assert {k for k in out if k.startswith("loss")} == {"loss", "loss_bce"}


def test_eq5_coordinates_follow_the_feature_maps_device_and_dtype():
    """F_coord is made on F_m's device and in its dtype: a bfloat16 neck stays bfloat16 (float32
    coordinates would promote the concatenation and fail the bf16 conv), a meta-device one runs."""
    neck = mmnet.FusionNeck(C, text_dim=6).eval()
    f_v2, f_v3, f_v4 = neck_inputs()
    bf16 = torch.bfloat16
    with torch.no_grad():
        out = neck.to(bf16)(f_v2.to(bf16), f_v3.to(bf16), f_v4.to(bf16), torch.randn(2, 6).to(bf16))
        assert out.dtype == bf16
        neck = neck.float().to("meta")
        meta = [x.to("meta") for x in (f_v2, f_v3, f_v4, torch.randn(2, 6))]
        assert neck(*meta).device.type == "meta"
