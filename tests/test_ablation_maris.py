"""MARIS's ablation switches (Tab. 2-5 of the paper): each changes only what it says, on the tiny
config with random weights, and the default config is the full model."""

import dataclasses

import pytest
import torch
from helpers import build, make_batch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer

import maris
from common.runconfig import parse_value

# The full model's own parts (the tiny config's parameter prefixes before the switches existed)
FULL = {"image_encoder", "text_encoder", "enhance", "mutual", "query", "decoder", "upsample",
        "query_mlp"}
FULL_NUMEL = 359_520  # tiny config, parameters outside the two encoders

# row -> (top-level parts removed, parts added), relative to the full model
CHANGES = {
    "w/o FE": ({"enhance"}, {"project_v3"}),
    "w/o MA": ({"mutual"}, {"project_l"}),
    "w/o DE": ({"query", "decoder", "upsample", "query_mlp"}, {"sam_decoder"}),
    "w/o attn. mask": (set(), set()),
    "w/ TOI-A": (set(), set()),  # adds decoder.<i>.token_to_image (checked below)
    "w/o ELP": (set(), set()),
}
ROWS = [row for row in maris.ABLATIONS if row != "Ours"]


def parts(model) -> set[str]:
    return {name.split(".")[0] for name, _ in model.named_parameters()}


def decoder_names(model) -> dict[str, tuple]:
    """{name: shape} of every parameter outside the two encoders."""
    return {n: tuple(p.shape) for n, p in model.named_parameters()
            if not n.startswith(("image_", "text_"))}


@pytest.fixture(scope="module")
def batch():
    return make_batch(build("maris"), n=2)


@pytest.fixture(scope="module")
def full():
    """The tiny config as it is: the full model, encoders frozen (random weights)."""
    return build("maris", freeze_encoders=True)


@pytest.fixture(scope="module")
def feats(batch, full):
    """The frozen encoders' features, shared by every variant (same seed, same encoders)."""
    with torch.no_grad():
        return (full.encode_image(batch["image"]),
                full.encode_text(batch["text"], batch["text_mask"]))


def run(model, batch, feats):
    """One training step's forward and backward from the cached features, without the image."""
    image_feats, text_feats = feats
    out = model(None, batch["text"], batch["text_mask"], target=batch["mask"],
                image_feats=image_feats, text_feats=text_feats)
    out["loss"].backward()
    return out


def test_default_config_is_the_full_model(full):
    cfg = maris.MARISConfig()
    assert maris.ABLATIONS["Ours"] == {}
    assert (cfg.feature_enhancement and cfg.mutual_aware_attention and cfg.mask_decoder == "maris"
            and not cfg.toi_attention and cfg.explicit_linguistic_guidance
            and cfg.a_transpose == "pixel_softmax" and cfg.tau > 0)
    model = full
    assert parts(model) == FULL
    assert sum(torch.Size(s).numel() for s in decoder_names(model).values()) == FULL_NUMEL
    assert not any(hasattr(model, a) for a in ("project_v3", "project_l", "sam_decoder"))
    assert all(block.token_to_image is None for block in model.decoder)


@pytest.mark.parametrize("row", maris.ABLATIONS)
def test_ablation_overrides_are_set_able_scalars(row):
    """Each override survives `train.py --set FIELD=VALUE` on top of the tiny config."""
    tiny = maris.CONFIGS["tiny"]
    for field, value in maris.ABLATIONS[row].items():
        assert isinstance(value, (bool, int, float, str))
        parsed = parse_value(str(value), getattr(tiny, field))
        assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("row", ROWS)
def test_ablation_changes_only_what_it_says(row, batch, feats, full):
    model = build("maris", freeze_encoders=True, **maris.ABLATIONS[row])
    removed, added = CHANGES[row]
    assert parts(model) == (FULL - removed) | added
    # every part the row does not name is built exactly as in the full model
    kept = {n: s for n, s in decoder_names(full).items() if n.split(".")[0] not in removed}
    assert kept.items() <= decoder_names(model).items()
    new = decoder_names(model).keys() - kept.keys()
    if row == "w/ TOI-A":
        assert new and all(".token_to_image." in n for n in new)
    else:
        assert all(n.split(".")[0] in added for n in new)

    out = run(model, batch, feats)
    assert out["mask_logits"].shape == (2, 1, model.cfg.image_size, model.cfg.image_size)
    assert torch.isfinite(out["loss"])
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:  # the frozen encoders, and SAM's decoder heads whose outputs no loss sees
            assert p.grad is None, name
    assert ("attn" in out) == (row != "w/o MA")  # no A without MA, and no panel of it
    assert len(model.vis_panels(out, 0)) == (0 if row == "w/o MA" else 1)


def test_without_attention_mask_keeps_every_real_word(batch, feats):
    """tau = 0 ("w/o attn. mask", Tab. 3 #8): sigmoid >= 0, so only padding is masked."""
    model = build("maris", freeze_encoders=True, **maris.ABLATIONS["w/o attn. mask"]).eval()
    with torch.no_grad():
        attn = model(None, batch["text"], batch["text_mask"], image_feats=feats[0],
                     text_feats=feats[1])["attn"]  # (B, N, L)
    real = batch["text_mask"][:, None, :].expand_as(attn)
    assert (attn[real] > 0).all() and (attn[~real] == 0).all()
    # the paper config's tau masks some pairs: the switch does change something
    with torch.no_grad():
        attn_tau = build("maris", freeze_encoders=True, tau=maris.CONFIGS["paper"].tau).eval()(
            None, batch["text"], batch["text_mask"], image_feats=feats[0],
            text_feats=feats[1])["attn"]
    assert (attn_tau[real] == 0).any()


def test_without_elp_the_decoder_sees_the_query_token_only(batch, feats):
    seen = {}
    for row in ("Ours", "w/o ELP"):
        model = build("maris", freeze_encoders=True, **maris.ABLATIONS[row])
        hook = model.decoder[0].self_attn_c.register_forward_hook(
            lambda m, args, out, row=row: seen.__setitem__(row, args[0].shape[1]))
        run(model, batch, feats)
        hook.remove()
    assert seen == {"Ours": 1 + batch["text"].shape[1], "w/o ELP": 1}  # F_c = [F_m(, F_val)]


def test_sam_decoder_variant_is_segment_anythings_mask_decoder(batch):
    model = build("maris", **maris.ABLATIONS["w/o DE"])
    decoder = model.sam_decoder.decoder
    assert type(decoder) is MaskDecoder and type(decoder.transformer) is TwoWayTransformer
    assert decoder.transformer_dim == model.cfg.dim and decoder.num_mask_tokens == 4
    # padded words are no prompt tokens: garbage at the padded positions changes nothing
    torch.manual_seed(0)
    B, N, L, D = 2, 12 * 12, 5, model.cfg.dim
    f_lav, f_val = torch.randn(B, N, D), torch.randn(B, L, D)
    text_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        ref = model.sam_decoder(f_lav, f_val, text_mask, 12, 12)
        f_val[1, 3:] = 1e3
        assert torch.equal(model.sam_decoder(f_lav, f_val, text_mask, 12, 12), ref)
    assert ref.shape == (B, 1, 48, 48)
    with pytest.raises(ValueError, match="need"):
        build("maris", mask_decoder="sam", toi_attention=True)
    with pytest.raises(ValueError, match="mask_decoder"):
        build("maris", mask_decoder="SAM")


def test_literal_a_transpose_matches_eq5():
    """a_transpose="literal": F_val = LN(A^T Z_v + Z_l) with A of Eq. (3) itself (a softmax over
    words), beside the default's softmax over pixels."""
    torch.manual_seed(0)
    block = maris.MutualAwareAttention(6, 5, 4, tau=0.3, a_transpose="literal")
    f_v, f_l = torch.randn(2, 7, 6), torch.randn(2, 3, 5)
    text_mask = torch.tensor([[True, True, True], [True, True, False]])
    lav, val, attn = block(f_v, f_l, text_mask)
    z_v, z_l = block.w_v(f_v), block.w_l(f_l)
    assert torch.allclose(val, block.norm_l(attn.transpose(1, 2) @ z_v + z_l), atol=1e-6)
    block.a_transpose = "pixel_softmax"
    lav_default, val_default, _ = block(f_v, f_l, text_mask)
    assert torch.equal(lav, lav_default) and not torch.allclose(val, val_default)
    with pytest.raises(ValueError, match="a_transpose"):
        maris.MutualAwareAttention(6, 5, 4, tau=0.3, a_transpose="transpose")


def test_literal_a_transpose_trains_with_the_same_parameters(batch, feats, full):
    model = build("maris", freeze_encoders=True, a_transpose="literal")
    assert decoder_names(model) == decoder_names(full)
    out = run(model, batch, feats)
    assert out["mask_logits"].shape == (2, 1, 96, 96)
    assert all(p.grad is not None for p in model.trainable_parameters())


@pytest.mark.parametrize("row", ["w/o FE", "w/o DE"])
def test_ablation_reads_the_image_or_its_cached_features_alike(row, batch, feats):
    model = build("maris", freeze_encoders=True, **maris.ABLATIONS[row]).eval()
    with torch.no_grad():
        from_image = model(batch["image"], batch["text"], batch["text_mask"])
        cached = model(None, batch["text"], batch["text_mask"], image_feats=feats[0],
                       text_feats=feats[1])
    assert torch.allclose(from_image["mask_logits"], cached["mask_logits"], atol=1e-5)


def test_ablations_cover_every_switch():
    """Every ablation field of MARISConfig is switched by some row (a_transpose aside: it is an
    interpretation of Eq. 5, not a row of the paper's tables)."""
    switched = {field for overrides in maris.ABLATIONS.values() for field in overrides}
    ablation_fields = {"feature_enhancement", "mutual_aware_attention", "mask_decoder", "tau",
                       "toi_attention", "explicit_linguistic_guidance"}
    assert switched == ablation_fields
    assert ablation_fields <= {f.name for f in dataclasses.fields(maris.MARISConfig)}
