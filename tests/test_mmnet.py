"""MMNet blocks against the paper's equations, and the CLIP image encoder."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build, make_batch

import mmnet
from common.encoders import CLIPImageEncoder, clip_config, resize_pos_embed


def randomise_norms(module: torch.nn.Module) -> None:
    """Give BatchNorm layers non-trivial statistics and scales: open_clip zero-initialises the last
    BN of every ResNet block, which would hide the residual branches."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)


# ---------------------------------------------------------------------------------------------
# CLIP image encoder (Eq. 1)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["RN50", "ViT-B-16", "tiny", "tiny-rn"])
def test_image_encoder_global_feature_matches_open_clip_at_native_size(arch):
    torch.manual_seed(0)
    enc = CLIPImageEncoder(arch).eval()
    randomise_norms(enc)
    size = 224 if arch in ("RN50", "ViT-B-16") else 128  # the size the towers are built for
    image = torch.randn(1, 3, size, size)
    with torch.no_grad():
        x2, x3, x4, z, z_bar = enc(image)
        reference = enc.visual(image)  # open_clip's own forward: CLIP's image embedding
    assert torch.allclose(z_bar, reference, atol=1e-4, rtol=1e-4)
    assert [t.shape[1] for t in (x2, x3, x4, z)] == [enc.dims[k] for k in ("x2", "x3", "x4", "z")]
    if not enc.is_vit:  # ResNet strides 8, 16, 32; z on the x4 grid
        assert x2.shape[-1] * 8 == x3.shape[-1] * 16 == x4.shape[-1] * 32 == size
        assert z.shape == (1, enc.dims["z"], size // 32, size // 32)
    else:  # ViT: every level on the patch grid
        side = size // enc.x3_stride
        assert x2.shape[-2:] == x3.shape[-2:] == x4.shape[-2:] == z.shape[-2:] == (side, side)


def test_attention_pool_spatial_outputs_are_the_mhsa_of_eq1():
    """[z_bar, z] = MHSA([mean(x4), x4]): z_bar from the mean token, z from the others, by
    open_clip's own attention-pool weights applied to every token as a query."""
    torch.manual_seed(0)
    enc = CLIPImageEncoder("tiny-rn").eval()
    pool = enc.visual.attnpool
    x4 = torch.randn(2, enc.dims["x4"], 4, 4)
    with torch.no_grad():
        z_bar, z = enc._attention_pool(x4)
        tokens = torch.cat([x4.flatten(2).mean(2, keepdim=True), x4.flatten(2)], 2).permute(2, 0, 1)
        tokens = tokens + pool.positional_embedding[:, None]
        ref, _ = F.multi_head_attention_forward(
            tokens, tokens, tokens, tokens.shape[-1], pool.num_heads, None,
            torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False,
            0.0, pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=False,
            use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight)
    assert torch.allclose(z_bar, ref[0], atol=1e-5)
    assert torch.allclose(z.flatten(2).permute(2, 0, 1), ref[1:], atol=1e-5)


@pytest.mark.parametrize("arch,size", [("tiny-rn", 224), ("tiny", 96), ("tiny", 136)])
def test_image_encoder_runs_at_other_sizes(arch, size):
    """open_clip's ResNet pool is built for one grid and fails on another; ours resizes it."""
    enc = CLIPImageEncoder(arch).eval()
    with pytest.raises(RuntimeError):
        enc.visual(torch.randn(1, 3, size, size))
    with torch.no_grad():
        *_, z, z_bar = enc(torch.randn(1, 3, size, size))
    side = size // (32 if arch == "tiny-rn" else enc.x3_stride)
    assert z.shape[-2:] == (side, side) and torch.isfinite(z).all() and torch.isfinite(z_bar).all()


def test_resize_pos_embed():
    g, C = 7, 5
    pos = torch.randn(1 + g * g, C)
    assert resize_pos_embed(pos, (g, g)) is pos  # native grid: unchanged
    out = resize_pos_embed(pos, (15, 11))
    assert out.shape == (1 + 15 * 11, C)
    assert torch.equal(out[0], pos[0])  # the global token's embedding is not a grid cell
    # a field that is constant over the grid stays constant; a linear ramp stays a ramp
    const = torch.cat([torch.zeros(1, C), torch.ones(g * g, C) * 3.0])
    assert torch.allclose(resize_pos_embed(const, (12, 12))[1:], torch.full((144, C), 3.0))
    ramp = torch.arange(g, dtype=torch.float32).repeat(g)[:, None].expand(-1, C)  # x coordinate
    wide = resize_pos_embed(torch.cat([torch.zeros(1, C), ramp]), (g, 2 * g))[1:, 0].view(g, 2 * g)
    assert torch.allclose(wide[0], wide[-1]) and (wide[:, 2:-2].diff(dim=1) > 0).all()


def test_image_encoder_loads_a_clip_state_dict(tmp_path):
    torch.manual_seed(0)
    src = CLIPImageEncoder("tiny-rn")
    randomise_norms(src)
    state = {f"visual.{k}": v for k, v in src.visual.state_dict().items()}
    state["text_projection"] = torch.randn(64, 64)  # the rest of a CLIP file is ignored
    path = str(tmp_path / "clip.pt")
    torch.save({"state_dict": state}, path)
    torch.manual_seed(1)
    dst = CLIPImageEncoder("tiny-rn", weights=path)
    image = torch.randn(1, 3, 128, 128)
    src.eval(), dst.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(src(image), dst(image)))
    del state["visual.attnpool.c_proj.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \['visual.attnpool.c_proj.weight'\]"):
        CLIPImageEncoder("tiny-rn", weights=path)


def test_vit_stage_blocks_default_to_thirds_of_the_depth():
    assert CLIPImageEncoder("ViT-B-16").vit_blocks == (4, 8, 12)
    assert clip_config("ViT-L-14")["vision_cfg"]["layers"] == 24  # -> (8, 16, 24)


# ---------------------------------------------------------------------------------------------
# MMNet blocks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [6, 5])
def test_vit_adapter_is_1x1_projections_resampled_to_resnet_relative_grids(side):
    """A ViT's x2, x3, z share one patch grid: F_v2 is the 1x1 projection repeated 2x, which the
    neck's 2x2 Avg gives back exactly (so the x2 path is a 1x1 projection, no transposed conv
    pretending otherwise), F_v3 the 1x1 projection, F_v4 a 2x2 stride-2 conv to half the grid."""
    torch.manual_seed(0)
    dims, C = dict(x2=6, x3=6, x4=6, z=4), 8
    proj = mmnet.VisualProjection(dims, C, vit=True).eval()
    convs = [m for m in proj.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert all(type(m) is torch.nn.Conv2d for m in convs)  # no transposed convolution
    assert [(m.kernel_size, m.stride) for m in convs] == [((1, 1), (1, 1))] * 2 + [((2, 2), (2, 2))]
    x2, x3, z = (torch.randn(2, dims[k], side, side) for k in ("x2", "x3", "z"))
    z_bar = torch.randn(2, dims["z"])
    with torch.no_grad():
        f_v2, f_v3, f_v4, f_vg = proj(x2, x3, z, z_bar)
        assert (f_v2.shape, f_v3.shape, f_v4.shape, f_vg.shape) == (
            (2, C, 2 * side, 2 * side), (2, C, side, side), (2, C, side // 2, side // 2), (2, C))
        assert torch.allclose(F.avg_pool2d(f_v2, 2, 2), proj.v2(x2), atol=1e-6)  # the neck's Avg
        assert torch.allclose(f_v3, proj.v3(x3))
        assert torch.allclose(f_v4, proj.v4(z))


def test_resnet_adapter_is_three_1x1_projections_at_the_stage_grids():
    torch.manual_seed(0)
    dims, C = dict(x2=4, x3=6, x4=8, z=5), 8
    proj = mmnet.VisualProjection(dims, C, vit=False).eval()
    x2, x3, z = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4), torch.randn(1, 5, 2, 2)
    with torch.no_grad():
        f_v2, f_v3, f_v4, _ = proj(x2, x3, z, torch.randn(1, 5))
        assert torch.equal(f_v2, proj.v2(x2)) and torch.equal(f_v4, proj.v4(z))
        assert f_v2.shape[-1] == 8 and f_v3.shape[-1] == 4 and f_v4.shape[-1] == 2


@pytest.mark.parametrize("kernel_relu", [False, True])
def test_projector_masks_are_conv2d_with_the_kernel_and_bias_of_eq14(kernel_relu):
    """F_pn = W_p F_qn (sigma = ReLU on it with kernel_relu): the first 9 C_p values are the 3x3
    kernel, the last the bias."""
    torch.manual_seed(0)
    C, Q = 16, 4
    proj = mmnet.MultiMaskProjector(C, kernel_relu=kernel_relu).eval()
    act = F.relu if kernel_relu else (lambda x: x)
    f_s, f_q = torch.randn(2, C, 5, 6), torch.randn(2, Q, C)
    with torch.no_grad():
        masks = proj(f_s, f_q)
        f_p = proj.vis(f_s)
        assert f_p.shape == (2, C // 2, 20, 24)  # 4x the decoder grid, C_p = C / 2
        for b in range(2):
            for n in range(Q):
                params = act(proj.w_p.weight @ f_q[b, n] + proj.w_p.bias)
                assert params.numel() == 9 * (C // 2) + 1
                kernel = params[:-1].view(1, C // 2, 3, 3)
                ref = F.conv2d(f_p[b:b + 1], kernel, params[-1:], padding=1)[0, 0]
                assert torch.allclose(masks[b, n], ref, atol=1e-5)


def test_query_generator_matches_eq9_and_eq10():
    torch.manual_seed(0)
    C, Cw, Q, side = 8, 6, 3, 4
    gen = mmnet.MultiQueryGenerator(C, Cw, Q, num_pixels=side * side).eval()
    f_v2, f_v3, f_v4 = torch.randn(2, C, 2 * side, 2 * side), torch.randn(2, C, side, side), \
        torch.randn(2, C, side // 2, side // 2)
    f_vg, words = torch.randn(2, C), torch.randn(2, 5, Cw)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        f_q, attn = gen(f_v2, f_v3, f_v4, f_vg, words, text_mask)
        f_vd = gen.to_queries(gen.dense(f_v2, f_v3, f_v4)).flatten(2)  # Eq. (7)
        relu = lambda lin, x: F.relu(lin[0].weight @ x + lin[0].bias)
        for b in range(2):
            real = [i for i in range(5) if text_mask[b, i]]
            f_tv = [relu(gen.w_t, words[b, i]) * relu(gen.w_vg, f_vg[b]) for i in range(5)]  # Eq. 8
            for n in range(Q):
                a = torch.stack([relu(gen.w_vd, f_vd[b, n]) @ relu(gen.w_a, f_tv[i]) for i in real])
                a = torch.softmax(a, 0)  # Eq. (9), softmax over the real words
                assert torch.allclose(attn[b, n, real], a, atol=1e-5)
                assert (attn[b, n, len(real):] == 0).all()  # padded words take no attention
                f_qn = sum(a[k] * relu(gen.w_tv, f_tv[i]) for k, i in enumerate(real))  # Eq. 10
                assert torch.allclose(f_q[b, n], f_qn, atol=1e-5)


@pytest.mark.parametrize("probs", [True, False])
def test_estimator_weights_sum_to_one_and_weight_the_masks(probs):
    """Eq. (15) sums to 1 over the queries; Eq. (16) y = sum_n S_qn mask_n, on probabilities by
    default (the returned logit is logit(y)), on logits with mix_probabilities=False."""
    model = build("mmnet", mix_probabilities=probs)
    batch = make_batch(model, n=2)
    model.eval()
    with torch.no_grad():
        out = model(**model.inputs_from(batch))
    scores, masks = out["query_scores"], out["query_masks"]
    assert scores.shape == (2, model.cfg.num_queries) and (scores > 0).all()
    assert torch.allclose(scores.sum(1), torch.ones(2))  # Eq. (15): softmax over the queries
    y = torch.zeros(2, 1, *masks.shape[-2:])
    for n in range(model.cfg.num_queries):  # Eq. (16), query by query
        mask_n = masks[:, n:n + 1].sigmoid() if probs else masks[:, n:n + 1]
        y += scores[:, n, None, None, None] * mask_n
    if probs:
        y = torch.log(y) - torch.log1p(-y)  # logit(y)
    H, W = batch["image"].shape[-2:]
    assert torch.allclose(out["mask_logits"], F.interpolate(y, size=(H, W), mode="bilinear"),
                          atol=1e-4)


def test_padding_length_does_not_change_the_output():
    model = build("mmnet").eval()
    batch = make_batch(model, n=2)
    pad = lambda x, k, v: torch.cat([x, x.new_full((x.shape[0], k), v)], 1)
    with torch.no_grad():
        a = model(**model.inputs_from(batch))
        b = model(image=batch["image"], text=pad(batch["text"], 6, model.tokenizer.pad_id),
                  text_mask=pad(batch["text_mask"], 6, False))
    assert torch.allclose(a["mask_logits"], b["mask_logits"], atol=1e-5)
    assert torch.allclose(a["query_scores"], b["query_scores"], atol=1e-6)
    assert (b["word_attn"][:, :, -6:] == 0).all()


def test_resnet_variant_trains_every_parameter():
    model = build("mmnet", "tiny-rn")
    randomise_norms(model.image_encoder)  # as after loading CLIP weights
    batch = make_batch(model, n=2)
    model.train()
    out = model(**model.inputs_from(batch), target=batch["mask"])
    assert out["mask_logits"].shape == (2, 1, 128, 128)
    assert out["query_masks"].shape == (2, 24, 32, 32)  # 4x the H/16 grid
    out["loss"].backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not bad, bad[:8]


@pytest.mark.parametrize("probs", [True, False])
def test_vis_panels_show_every_query_with_its_score_and_the_weighted_sum(probs):
    """Fig. 2, 5: each query's mask, best score first, then Eq. (16)'s mix as the model makes it
    (a weighted sum of probabilities, or the probability of the weighted sum of logits)."""
    model = build("mmnet", mix_probabilities=probs).eval()
    batch = make_batch(model, n=2)
    with torch.no_grad():
        out = model(**model.inputs_from(batch))
    panels = model.vis_panels(out, 1)
    Q = model.cfg.num_queries
    assert len(panels) == Q + 1
    scores = [float(t.split("score ")[1]) for t, _ in panels[:Q]]
    assert scores == sorted(scores, reverse=True)
    assert math.isclose(sum(scores), 1.0, abs_tol=Q * 1e-3)
    assert all(0 <= m.min() and m.max() <= 1 and m.ndim == 2 for _, m in panels)
    assert panels[-1][0] == "weighted sum of masks (Eq. 16)"
    s, m = out["query_scores"][1], out["query_masks"][1]
    mixed = (s[:, None, None] * m.sigmoid()).sum(0) if probs else (s[:, None, None] * m).sum(
        0).sigmoid()
    assert torch.allclose(panels[-1][1], mixed, atol=1e-6)


def test_tokenizer_and_input_spec_follow_the_paper():
    cfg = mmnet.CONFIGS["paper"]
    assert (cfg.image_size, cfg.max_tokens, cfg.num_queries, cfg.dim) == (480, 17, 24, 512)
    tok = build("mmnet").tokenizer
    ids, truncated = tok("the man in the red shirt standing on the far left next to the tall lamp")
    assert len(ids) == 17 and truncated and ids[0] == tok.sot_id and ids[-1] == tok.eot_id


def test_decoder_attention_is_softmax_qk_over_sqrt_d_times_v():
    """Eq. (12): the decoder's self- and cross-attention in eval mode (dropout off) equal the
    explicit formula, with the parameter names checkpoints hold; in training, dropout acts."""
    torch.manual_seed(0)
    C, heads = 16, 4
    layer = mmnet.DecoderLayer(C, heads, ffn_dim=32, dropout=0.5)
    vis, queries = torch.randn(2, 9, C), torch.randn(2, 5, C)
    for attn, kv in ((layer.self_attn, vis), (layer.cross_attn, queries)):
        assert sorted(k for k in attn.state_dict()) == sorted(
            f"{n}.{p}" for n in ("to_q", "to_k", "to_v", "to_out") for p in ("weight", "bias"))
        split = lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, nh, T, hs)
        q, k, v = split(attn.to_q(vis)), split(attn.to_k(kv)), split(attn.to_v(kv))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // heads), dim=-1)
        ref = attn.to_out((weights @ v).transpose(1, 2).flatten(2))
        layer.eval()
        with torch.no_grad():
            assert (attn(vis, kv, kv) - ref).abs().max() < 1e-5
        layer.train()
        with torch.no_grad():
            assert not torch.allclose(attn(vis, kv, kv), ref, atol=1e-3)  # attention dropout


# ---------------------------------------------------------------------------------------------
# The paper configs' recipe (Sec. 4.1, 4.4) and the forward contract
# ---------------------------------------------------------------------------------------------

_SEC41 = dict(
    image_size=480,  # Sec. 4.1: "Input images are resized to 480 x 480"
    max_tokens=17,  # Sec. 4.1: 17 for RefCOCO(+) with [SOS]/[EOS] (22 for G-Ref: --set)
    optimiser="Adam",  # Sec. 4.1: "the Adam optimizer"
    lr=1e-5,  # Sec. 4.1: "lr = 1e-5"
    weight_decay=0.0,  # not in the paper (Adam's default, none)
    warmup=0.0,  # not in the paper (none)
    schedule="poly",  # Sec. 4.1: "decreases with polynomial decay [3]"
    power=0.9,  # not in the paper: the power of its ref. [3], DeepLab
    batch_size=64,  # Sec. 4.1: "a batch size of 64"
    epochs=100,  # Sec. 4.1: "train the network for 100 epochs"
    clip_grad=0.0,  # not in the paper (none)
    hflip=False,  # not in the paper (no augmentation)
)
PAPER_RECIPES = {
    "paper": _SEC41,  # ViT-B, Table 1
    "paper-vit-l": _SEC41,  # ViT-L, Table 1
    "paper-rn101": _SEC41,  # Sec. 4.1: "preparing the ResNet-101"
    "paper-rn50": {**_SEC41, "epochs": 50},  # Sec. 4.4: "the epoch is set to 50"
}


def test_paper_configs_are_the_papers_recipe():
    assert {k for k in mmnet.CONFIGS if k.startswith("paper")} == set(PAPER_RECIPES)
    model = build("mmnet")  # the optimiser and schedule do not depend on the config
    opt, sched = model.configure_optimizers(lr=1.0, total_steps=10)
    for name, recipe in PAPER_RECIPES.items():
        cfg = mmnet.CONFIGS[name]
        fields = {k: getattr(cfg, k) for k in recipe if hasattr(cfg, k)}
        assert fields == {k: v for k, v in recipe.items() if k in fields}, name
        assert type(opt).__name__ == recipe["optimiser"], name
        assert opt.param_groups[0]["weight_decay"] == recipe["weight_decay"], name
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([(1 - t / 10) ** 0.9 for t in range(5)], rel=1e-6)  # poly
    # the config's power and warm-up reach the schedule (the paper's equal its defaults)
    opt, sched = build("mmnet", power=0.5, warmup=0.5).configure_optimizers(lr=1.0,
                                                                            total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[4] and lrs[5] > lrs[9] > 0
    assert lrs[9] / lrs[5] == pytest.approx(((1 - 9 / 10) / (1 - 5 / 10)) ** 0.5, rel=1e-6)
    for name in ("tiny", "tiny-rn"):  # ours: from scratch on CPU, clipped and flipped
        assert (mmnet.CONFIGS[name].clip_grad, mmnet.CONFIGS[name].hflip) == (1.0, True)


def test_forward_contract():
    """Inputs: image (B, 3, H, W) float, text (B, L) int64 ids, text_mask (B, L) bool; outputs:
    mask logits at the input size, every query's mask logits, scores, word attention; with a
    target one loss term, BCE."""
    model = build("mmnet").train()
    assert model.input_names == ("image", "text", "text_mask")
    batch = make_batch(model, n=2)
    inputs = model.inputs_from(batch)
    image, text, mask = inputs["image"], inputs["text"], inputs["text_mask"]
    assert image.shape == (2, 3, 96, 96) and image.dtype == torch.float32
    assert text.dtype == torch.int64 and mask.dtype == torch.bool and text.shape == mask.shape
    out = model(**inputs, target=batch["mask"])
    Q, L = model.cfg.num_queries, text.shape[1]
    side = 96 // model.image_encoder.x3_stride
    assert out["mask_logits"].shape == (2, 1, 96, 96) and out["mask_logits"].dtype == torch.float32
    assert out["query_masks"].shape == (2, Q, 4 * side, 4 * side)
    assert out["query_scores"].shape == (2, Q) and out["word_attn"].shape == (2, Q, L)
    assert out["loss"].shape == () and set(out) == {"mask_logits", "query_masks", "query_scores",
                                                    "word_attn", "loss", "loss_bce"}


def test_the_configs_kernel_relu_reaches_the_projector():
    """Eq. (14)'s sigma on the generated kernel is a config switch (see the Interpretations):
    the model builds the projector the config names."""
    assert build("mmnet", kernel_relu=True).projector.kernel_relu is True
    assert build("mmnet", kernel_relu=False).projector.kernel_relu is False
