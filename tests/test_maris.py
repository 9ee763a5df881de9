"""MARIS blocks against the paper's equations, and its encoders."""

import dataclasses
import math
import warnings

import pytest
import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT

import maris
from common.encoders import CLIPTextEncoder, SAMImageEncoder
from common.tokenizers import ClipTokenizer


def eq3_to_5(f_v, f_l, text_mask, w_v, w_l, norm_v, norm_l, tau):
    """Direct transcription of Eq. (3)-(5), one sample at a time, loops over pixels and words."""
    outs_v, outs_l = [], []
    for b in range(f_v.shape[0]):
        z_v, z_l = f_v[b] @ w_v.T, f_l[b] @ w_l.T
        n, l = z_v.shape[0], z_l.shape[0]
        s = z_v @ z_l.T
        keep = [[(1 / (1 + math.exp(-s[i, j].item())) >= tau) and bool(text_mask[b, j])
                 for j in range(l)] for i in range(n)]
        a_v, a_l = torch.zeros(n, l), torch.zeros(n, l)
        for i in range(n):  # softmax over the words a pixel keeps
            js = [j for j in range(l) if keep[i][j]]
            if js:
                a_v[i, js] = torch.softmax(s[i, js], 0)
        for j in range(l):  # softmax over the pixels a word keeps
            is_ = [i for i in range(n) if keep[i][j]]
            if is_:
                a_l[is_, j] = torch.softmax(s[is_, j], 0)
        outs_v.append(norm_v(a_v @ z_l + z_v))
        outs_l.append(norm_l(a_l.T @ z_v + z_l))
    return torch.stack(outs_v), torch.stack(outs_l)


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.7])
def test_mutual_aware_attention_matches_equations(tau):
    torch.manual_seed(0)
    block = maris.MutualAwareAttention(vis_dim=6, text_dim=5, dim=4, tau=tau)
    f_v, f_l = torch.randn(2, 7, 6), torch.randn(2, 3, 5)
    text_mask = torch.tensor([[True, True, True], [True, True, False]])
    lav, val, _ = block(f_v, f_l, text_mask)
    ref_lav, ref_val = eq3_to_5(f_v, f_l, text_mask, block.w_v.weight, block.w_l.weight,
                                block.norm_v, block.norm_l, tau)
    assert torch.allclose(lav, ref_lav, atol=1e-5)
    assert torch.allclose(val, ref_val, atol=1e-5)


def test_attention_mask_drops_irrelevant_pairs_and_never_nans():
    torch.manual_seed(0)
    block = maris.MutualAwareAttention(4, 4, 4, tau=0.5)
    f_v, f_l = torch.randn(1, 5, 4), torch.randn(1, 3, 4)
    mask = torch.ones(1, 3, dtype=torch.bool)
    _, _, attn = block(f_v, f_l, mask)
    relevance = torch.sigmoid(block.w_v(f_v) @ block.w_l(f_l).transpose(1, 2))
    assert (attn[relevance < 0.5] == 0).all()  # the text's reading of Eq. (4)
    assert (attn[relevance >= 0.5] > 0).all()
    block.tau = 1.01  # every pair masked: no attention at all, F_lav = LN(Z_v), no NaN
    lav, val, attn = block(f_v, f_l, mask)
    assert torch.isfinite(lav).all() and torch.isfinite(val).all() and (attn == 0).all()
    assert torch.allclose(lav, block.norm_v(block.w_v(f_v)))


def test_padded_words_take_no_attention():
    torch.manual_seed(0)
    block = maris.MutualAwareAttention(4, 4, 4, tau=0.0)
    _, _, attn = block(torch.randn(1, 5, 4), torch.randn(1, 3, 4),
                       torch.tensor([[True, True, False]]))
    assert (attn[..., 2] == 0).all() and torch.allclose(attn.sum(-1), torch.ones(1, 5))


def test_feature_enhancement_uses_all_three_levels():
    fe = maris.FeatureEnhancement(in_dim=8, dim=16)
    feats = [torch.randn(2, 4, 4, 8, requires_grad=True) for _ in range(3)]
    out = fe(*feats)
    assert out.shape == (2, 16, 4, 4)
    out.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_sam_encoder_returns_the_global_attention_blocks():
    torch.manual_seed(0)
    enc = SAMImageEncoder("tiny", img_size=64, global_blocks=(1, 2, 3))
    assert enc.out_indexes == [3, 4, 5]
    # segment-anything's own encoder with the same weights, run block by block
    ref = ImageEncoderViT(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=2,
                          mlp_ratio=4, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
                          use_rel_pos=True, global_attn_indexes=(1, 3, 4, 5), window_size=4)
    ref.load_state_dict(enc.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    h = ref.patch_embed(x) + ref.pos_embed
    expected = []
    for i, blk in enumerate(ref.blocks):
        h = blk(h)
        if i in (3, 4, 5):
            expected.append(h)
    for got, want in zip(enc(x), expected):
        assert got.shape == (1, 8, 8, 64) and torch.allclose(got, want, atol=1e-5)


def test_sam_weights_load_from_a_segment_anything_checkpoint(tmp_path):
    torch.manual_seed(1)
    src = SAMImageEncoder("tiny", img_size=64)
    state = {f"image_encoder.{k}": v for k, v in src.state_dict().items()}
    state["image_encoder.neck.0.weight"] = torch.zeros(1)  # SAM parts we do not build
    state["mask_decoder.iou_token.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "sam.pth")
    dst = SAMImageEncoder("tiny", img_size=64, weights=str(tmp_path / "sam.pth"))
    assert all(torch.equal(a, b)
               for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(ValueError, match="shape mismatch"):
        SAMImageEncoder("tiny", img_size=128, weights=str(tmp_path / "sam.pth"))


def test_clip_text_weights_load_from_an_open_clip_checkpoint(tmp_path):
    torch.manual_seed(2)
    src = CLIPTextEncoder("tiny")
    state = {f"module.{k}": v for k, v in src.state_dict().items()}  # as saved under DDP
    state["module.visual.conv1.weight"] = torch.zeros(1)
    state["module.logit_scale"] = torch.zeros(())
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "clip.pt")
    dst = CLIPTextEncoder("tiny", weights=str(tmp_path / "clip.pt"), project=False)
    assert torch.equal(dst.token_embedding.weight, src.token_embedding.weight)
    assert dst.text_projection is None
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        CLIPTextEncoder("tiny", weights=str(tmp_path / "nowhere.pt"))


def test_clip_tokenizer_offline_truncation_and_empty():
    tok = ClipTokenizer(6)
    ids, truncated = tok("the big red circle")
    assert ids[0] == tok.sot_id and ids[-1] == tok.eot_id and not truncated and len(ids) == 6
    ids, truncated = tok("the big red circle on the very far left")
    assert len(ids) == 6 and ids[-1] == tok.eot_id and truncated
    assert tok("  la   pomme  rouge ")[0] == tok("la pomme rouge")[0]
    assert len(tok("der große Bär")[0]) > 2  # non-ASCII text tokenises
    for bad in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match="empty"):
            tok(bad)


def test_frozen_when_weights_given_trained_otherwise(tmp_path):
    cfg = maris.CONFIGS["tiny"]
    src = SAMImageEncoder("tiny", img_size=cfg.image_size)
    torch.save({f"image_encoder.{k}": v for k, v in src.state_dict().items()}, tmp_path / "s.pth")
    with pytest.warns(UserWarning, match="text encoder has random weights"):
        model = maris.MARIS(maris.MARISConfig(
            **{**cfg.__dict__, "image_weights": str(tmp_path / "s.pth")}))
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for p in model.text_encoder.parameters())


def test_vis_panel_is_the_vision_guided_attention_of_fig5a():
    """Fig. 5(a): for each pixel, its weights over the words (A, Eq. 3); the panel shows the
    largest, on the feature grid."""
    from helpers import build, make_batch

    model = build("maris").eval()
    batch = make_batch(model, n=2)
    with torch.no_grad():
        out = model(**model.inputs_from(batch))
    side = model.cfg.image_size // 8  # tiny SAM: patch 8
    assert out["attn"].shape == (2, side * side, batch["text"].shape[1])
    [(title, panel)] = model.vis_panels(out, 1)
    assert "vision-guided" in title and "5a" in title and len(title) <= 42  # eval.py's title width
    assert torch.equal(panel, out["attn"][1].max(1).values.view(side, side))


# The paper configs' recipes. The paper defers its implementation details to a supplementary we
# do not have (Sec. Metrics: "Implementation details are reported in the supplementary
# material"), so apart from the input size and the frozen encoders every value is ours.
PAPER_RECIPE = dict(
    image_size=1024,  # Sec. Image Encoder: SAM "takes images of size 1024x1024"
    max_tokens=20,  # not in the paper (CLIP tokens incl. start/end)
    optimiser="AdamW",  # not in the paper
    lr=1e-4,  # not in the paper
    weight_decay=1e-2,  # not in the paper
    warmup=0.05,  # not in the paper (share of the steps, linear)
    schedule=("poly", 0.9),  # not in the paper
    batch_size=32,  # not in the paper (global batch)
    epochs=50,  # not in the paper
    clip_grad=0.0,  # not in the paper, so none
    hflip=False,  # not in the paper, so no augmentation
    freeze_encoders=True,  # Sec. Methodology: "the parameters of the image and text encoder
    # are frozen"
)
PAPER_RECIPES = {
    "paper": dict(PAPER_RECIPE, sam_arch="vit_h"),  # Sec. Image Encoder: "SAM uses a VIT-H"
    "paper-vit-b": dict(PAPER_RECIPE, sam_arch="vit_b"),  # ours: not in the paper
}


def test_paper_configs_are_the_recipe_table():
    assert {c for c in maris.CONFIGS if c.startswith("paper")} == set(PAPER_RECIPES)
    tiny = maris.CONFIGS["tiny"]
    assert tiny.clip_grad == 1.0 and tiny.hflip  # the from-scratch tiny run keeps both
    for name, recipe in PAPER_RECIPES.items():
        cfg = maris.CONFIGS[name]
        fields = {k: v for k, v in recipe.items() if k not in ("optimiser", "schedule")}
        assert {k: getattr(cfg, k) for k in fields} == fields, name
        # optimiser and schedule: configure_optimizers on a tiny-sized model with this recipe
        small = dataclasses.replace(cfg, sam_arch="tiny", image_size=96, clip_arch="tiny", dim=64,
                                    heads=4, freeze_encoders=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = maris.MARIS(small)
        total = 200
        opt, sched = model.configure_optimizers(cfg.lr, total)
        assert type(opt).__name__ == recipe["optimiser"]
        assert [(g["weight_decay"], g["initial_lr"]) for g in opt.param_groups] == [
            (recipe["weight_decay"], recipe["lr"])]
        model.cfg = dataclasses.replace(small, weight_decay=0.05)  # read from the config
        assert model.configure_optimizers(cfg.lr, total)[0].param_groups[0]["weight_decay"] == 0.05
        kind, power = recipe["schedule"]
        warm = int(recipe["warmup"] * total)
        factor = sched.lr_lambdas[0]
        assert [factor(s) for s in (0, warm - 1)] == pytest.approx([1 / warm, 1.0])
        for step in (warm, 120, total - 1):
            assert factor(step) == pytest.approx((1 - step / total) ** power)


def test_forward_contract():
    """What train.py, eval.py and a user's code rely on: the inputs by name, dtype and shape;
    the outputs; the loss terms of Eq. (9); cached features standing in for the image."""
    cfg = dataclasses.replace(maris.CONFIGS["tiny"], image_size=32, dim=16, heads=2,
                              up_dims=(8, 4), freeze_encoders=True)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = maris.MARIS(cfg).eval()
    assert model.input_names == ("image", "text", "text_mask")
    assert maris.MARIS.input_names_for(cfg) == model.input_names
    spec = model.input_spec
    assert (spec.size, spec.resize, spec.mean, spec.std) == (
        32, "longest", SAMImageEncoder.pixel_mean, SAMImageEncoder.pixel_std)
    assert isinstance(model.tokenizer, ClipTokenizer) and model.tokenizer.max_len == cfg.max_tokens
    B, L = 2, 5
    image = torch.randn(B, 3, 32, 32)  # float32, normalised
    text = torch.randint(1, 100, (B, L))  # int64 CLIP ids
    text_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])  # bool, True on real tokens
    target = (torch.rand(B, 1, 32, 32) > 0.5).float()  # float {0, 1}
    with torch.no_grad():
        out = model(image, text, text_mask)
        assert set(out) == {"mask_logits", "attn"}
        assert out["mask_logits"].shape == (B, 1, 32, 32)
        assert out["mask_logits"].dtype == torch.float32
        assert out["attn"].shape == (B, 4 * 4, L) and out["attn"].dtype == torch.float32
        trained = model(image, text, text_mask, image_mask=torch.ones(B, 32, 32, dtype=torch.bool),
                        target=target)
        assert set(trained) == {"mask_logits", "attn", "loss", "loss_focal", "loss_dice"}
        assert all(trained[k].shape == () and trained[k].dtype == torch.float32
                   for k in ("loss", "loss_focal", "loss_dice"))
        # the frozen encoders' features, by name and shape, give the same output without the image
        image_feats = model.encode_image(image)
        text_feats = model.encode_text(text, text_mask)
        assert {k: tuple(v.shape) for k, v in image_feats.items()} == {
            k: (B, 4, 4, model.image_encoder.dim) for k in ("f_v1", "f_v2", "f_v3")}
        assert tuple(text_feats["f_l"].shape) == (B, L, model.text_encoder.out_dim)
        cached = model(None, text, text_mask, image_feats=image_feats, text_feats=text_feats)
    assert torch.allclose(cached["mask_logits"], out["mask_logits"], atol=1e-5)
    with pytest.raises(ValueError, match="no image"):
        model(None, text, text_mask)
