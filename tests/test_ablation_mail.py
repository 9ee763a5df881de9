"""MaIL's ablation switches (Sec. 4.3, mail.ABLATIONS): each row switches off only what it says
(the part is gone or gets no gradient), keeps the output's shape and trains; the default config
is the full model; every row is reachable from train.py's --set on the tiny config."""

import dataclasses
import json
import os

import pytest
import torch
from helpers import build, make_batch, ref, write_refer

import eval as evaluate
import mail
import train
from common.runconfig import build_config

# the full model's parameters outside ViLT, as before the ablation switches existed
FULL_DECODER_AND_MASK_PARAMS = [
    "encoder.mask_type", "encoder.mask_embed.proj.weight", "encoder.mask_embed.proj.bias",
    "score.net.0.weight", "score.net.0.bias", "score.net.2.weight", "score.net.2.bias",
    "reduce_i.weight", "reduce_i.bias", "reduce_m.weight", "reduce_m.bias",
    *[f"head.blocks.{i}.{j}" for i in range(4) for j in ("0.weight", "1.weight", "1.bias")],
    "head.out.weight", "head.out.bias"]

# per row: parameter prefixes that must not exist, ones that must get no gradient, whether the
# output has scores (mask_scores, selected) and whether the loss has a select term
EXPECT = {
    "w/o mask modality": dict(absent=("encoder.mask_embed", "encoder.mask_type", "score.",
                                      "reduce_m."), no_grad=(), scores=False, select=False),
    "decoder image only": dict(absent=("score.", "reduce_m."), no_grad=(), scores=False,
                               select=False),
    "decoder mask only": dict(absent=("reduce_i.",), no_grad=(), scores=True, select=True),
    "selection mean": dict(absent=("score.",), no_grad=(), scores=False, select=False),
    "selection maximum": dict(absent=("score.",), no_grad=(), scores=False, select=False),
    "selection weighted sum": dict(absent=(), no_grad=(), scores=True, select=True),
    "w/o select loss": dict(absent=(), no_grad=("score.",), scores=True, select=False),
}


@pytest.fixture(scope="module")
def full():
    return build("mail")


@pytest.fixture(scope="module")
def batch(full):
    return make_batch(full, n=3)


@pytest.fixture(scope="module", params=list(mail.ABLATIONS))
def ablated(request):
    return request.param, build("mail", **mail.ABLATIONS[request.param])


def _vilt_inputs(model, batch) -> list[int]:
    """Sequence lengths of every call of the transformer in one forward."""
    lengths = []
    hook = model.encoder.vilt.register_forward_pre_hook(
        lambda mod, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        model.eval()(**model.inputs_from(batch))
    hook.remove()
    return lengths


def _head_input(model, batch) -> torch.Tensor:
    """F^ of Eq. (8), the segmentation head's input, in eval mode."""
    got = []
    hook = model.head.register_forward_pre_hook(lambda mod, args: got.append(args[0]))
    with torch.no_grad():
        model.eval()(**model.inputs_from(batch))
    hook.remove()
    return got[0]


def test_every_expected_row_is_an_ablation():
    assert set(EXPECT) == set(mail.ABLATIONS)


def test_default_config_is_the_full_model(full):
    cfg = mail.CONFIGS["tiny"]
    for field, choices in mail.CHOICES.items():
        assert getattr(cfg, field) == choices[0] == getattr(mail.MaILConfig(), field)
    assert cfg.select_weight == mail.MaILConfig().select_weight == 0.1  # Sec. 4.1
    names = [n for n, _ in full.named_parameters() if not n.startswith("encoder.vilt.")]
    assert names == FULL_DECODER_AND_MASK_PARAMS
    assert full.head.blocks[0][0].in_channels == 2 * (full.encoder.vilt.dim // 3) + 2


def test_each_row_is_settable_from_the_command_line_on_tiny():
    for name, overrides in mail.ABLATIONS.items():
        assert overrides and all(isinstance(v, (bool, int, float, str)) for v in overrides.values())
        sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
        args = train.parse_args(["--model", "mail", "--config", "tiny", *sets])
        cfg = build_config(mail, args)
        assert cfg == dataclasses.replace(mail.CONFIGS["tiny"], **overrides), name


def test_ablation_switches_off_only_what_it_says(ablated, full, batch):
    name, model = ablated
    expect = EXPECT[name]
    names = {n for n, _ in model.named_parameters()}
    full_names = {n for n, _ in full.named_parameters()}
    gone = full_names - names
    assert names <= full_names  # nothing new
    assert {n for n in full_names if n.startswith(expect["absent"])} == gone, name
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**model.inputs_from(batch), target=batch["mask"])
    B, _, H, W = batch["image"].shape
    assert out["mask_logits"].shape == (B, 1, H, W) and torch.isfinite(out["mask_logits"]).all()
    assert ("mask_scores" in out) == ("selected" in out) == expect["scores"]
    assert ("loss_select" in out) == expect["select"]
    assert bool(model.vis_panels(out, 0)) == expect["scores"]  # Fig. 5 needs scores
    want = out["loss_focal"] + out["loss_dice"]
    if expect["select"]:
        want = want + model.cfg.select_weight * out["loss_select"]
    assert torch.equal(out["loss"], want)
    out["loss"].backward()
    for n, p in model.named_parameters():
        if n.startswith(expect["no_grad"]):  # and frozen, or DDP stops the run (train.py)
            assert p.grad is None and not p.requires_grad, n
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, n


def test_without_mask_modality_no_mask_token_enters_the_transformer(full, batch):
    model = build("mail", **mail.ABLATIONS["w/o mask modality"])
    N = (batch["image"].shape[-2] // 16) * (batch["image"].shape[-1] // 16)  # tiny: P = 16
    L = batch["text"].shape[1]
    assert _vilt_inputs(model, batch) == [1 + N + L]  # class token, patches, words
    assert _vilt_inputs(full, batch)[0] > 1 + N + L  # the full model adds mask tokens
    # the candidates change nothing: no tokens, no selection
    other = dict(batch, cand_masks=torch.zeros_like(batch["cand_masks"][:, :1]),
                 cand_valid=torch.ones_like(batch["cand_valid"][:, :1]))
    with torch.no_grad():
        a = model(**model.inputs_from(batch))["mask_logits"]
        b = model(**model.inputs_from(other))["mask_logits"]
    assert torch.equal(a, b)


@pytest.mark.slow
def test_without_mask_modality_needs_no_proposals_on_refer(tmp_path):
    """Tab. 2 variant 1 reads no candidates, so on a REFER dataset (which has no proposals of
    its own) it trains and evaluates without a proposals file, records no candidate source (not
    "oracle": it saw no annotation at inference) and warns that a given file is ignored; the
    full model still stops and asks for proposals."""
    images = [{"id": i, "height": 24, "width": 32, "file_name": f"COCO_train2014_{i:012d}.jpg"}
              for i in (1, 2)]
    anns = [{"id": 10 + i, "image_id": i, "category_id": 1,
             "segmentation": [[2, 2, 14, 2, 14, 14, 2, 14]]} for i in (1, 2)]
    refs = [ref(1, 11, 1, "train", "the thing", "left one"), ref(2, 12, 2, "train", "a box"),
            ref(3, 11, 1, "val", "the thing")]
    write_refer(tmp_path / "refer", refs, images, anns)
    common = ["--model", "mail", "--dataset", "refcoco", "--data-root", str(tmp_path / "refer"),
              "--batch-size", "2", "--max-steps", "1", "--workers", "0", "--no-val"]
    row = ["--set", "encoder_modality=image+language", "--set", "decoder_modality=image"]
    train.main(common + row + ["--out", str(tmp_path / "a")])
    with open(tmp_path / "a" / "args.json") as f:
        assert json.load(f)["candidates"] is None
    results = evaluate.main(["--checkpoint", str(tmp_path / "a" / "last.pt"), "--dataset",
                             "refcoco", "--data-root", str(tmp_path / "refer")])
    assert results["val"]["n"] == 1
    with pytest.warns(UserWarning, match="takes no candidate masks"):
        train.main(common + row + ["--oracle-candidates", "--out", str(tmp_path / "b")])
    with open(tmp_path / "b" / "args.json") as f:
        assert json.load(f)["candidates"] is None  # the flag changed nothing: not an oracle run
    with pytest.raises(ValueError, match="--candidates PROPOSALS.json"):
        train.main(common + ["--out", str(tmp_path / "c")])
    assert not os.path.exists(tmp_path / "c" / "last.pt")


def test_decoder_modality_feeds_eq8_only_the_named_features(batch):
    """Tab. 2 variants 3 and 4: F^ = [reduce_i(F_I); O] or [reduce_m(F_M^rho); O]."""
    for variant, reduce in (("decoder image only", "reduce_i"), ("decoder mask only", "reduce_m")):
        model = build("mail", **mail.ABLATIONS[variant])
        r = model.encoder.vilt.dim // model.cfg.reduction
        assert model.head.blocks[0][0].in_channels == r + 2
        f_hat = _head_input(model, batch)
        inputs = model.inputs_from(batch)
        cand_masks = inputs["cand_masks"] & inputs["cand_valid"][:, :, None, None]
        with torch.no_grad():
            f_i, f_m = model.encoder(inputs["image"], inputs["text"], inputs["text_mask"],
                                     cand_masks, inputs["cand_valid"], inputs.get("image_mask"))
            feature = f_i if reduce == "reduce_i" else model.select(
                f_i, f_m, cand_masks, inputs["cand_valid"])[0]
            want = getattr(model, reduce)(feature)
        assert f_m is not None  # mask tokens still enter the encoder (Encoder: I + M + L)
        assert torch.allclose(f_hat[:, :r], want, atol=1e-5), variant


def test_mean_and_maximum_pool_the_valid_candidates():
    g = torch.Generator().manual_seed(0)
    f_m = torch.randn(3, 4, 3, 2, 5, generator=g)
    valid = torch.tensor([[True, True, True, False], [True, False, True, True],
                          [False, False, True, False]])  # one candidate: its own features
    f_m = f_m * valid[:, :, None, None, None]  # padded candidates' features are zero
    mean = mail.pool_mask_features(f_m, valid, "mean")
    top = mail.pool_mask_features(f_m, valid, "maximum")
    for b in range(3):
        assert torch.allclose(mean[b], f_m[b, valid[b]].mean(0), atol=1e-6)
        assert torch.equal(top[b], f_m[b, valid[b]].max(0).values)


def test_weighted_sum_weighs_mask_features_by_the_normalised_scores(batch):
    model = build("mail", **mail.ABLATIONS["selection weighted sum"]).eval()
    inputs = model.inputs_from(batch)
    cand_masks = inputs["cand_masks"] & inputs["cand_valid"][:, :, None, None]
    with torch.no_grad():
        f_i, f_m = model.encoder(inputs["image"], inputs["text"], inputs["text_mask"], cand_masks,
                                 inputs["cand_valid"], inputs.get("image_mask"))
        got, scores, _ = model.select(f_i, f_m, cand_masks, inputs["cand_valid"])
    weights = torch.softmax(scores, 1)
    for b in range(len(scores)):
        want = sum(weights[b, k] * f_m[b, k] for k in range(f_m.shape[1]))
        assert torch.allclose(got[b], want, atol=1e-5)
    with torch.no_grad():  # every candidate counts: none is marked as selected
        panels = model.vis_panels(model(**model.inputs_from(batch)), 0)
    assert panels and not any("SELECTED" in title for title, _ in panels)
    # unlike argmax selection, the weighted sum passes focal + dice gradients to the score MLP
    model.train().zero_grad(set_to_none=True)
    model(**model.inputs_from(batch), target=batch["mask"])["loss_focal"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.score.parameters())


def test_without_select_loss_the_score_mlp_still_selects(batch):
    model = build("mail", **mail.ABLATIONS["w/o select loss"]).eval()
    with torch.no_grad():
        out = model(**model.inputs_from(batch), target=batch["mask"])
    assert "loss_select" not in out
    assert torch.equal(out["selected"], out["mask_scores"].argmax(1))


@pytest.mark.parametrize("changes, match", [
    ({"encoder_modality": "mask+language"}, "encoder_modality"),  # Tab. 2 variant 2: not built
    ({"decoder_modality": "image+mask+language"}, "decoder_modality"),
    ({"mask_selection": "attention"}, "mask_selection"),
    ({"encoder_modality": "image+language"}, "needs them from the encoder"),
])
def test_values_without_a_paper_row_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        build("mail", **changes)
