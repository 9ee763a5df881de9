"""MaIL's equations and architectural statements (mail.md Sec. 3-4), each re-stated directly on
small random inputs and compared with the module, or checked through a property it implies.
A test is named after the equation or statement it pins; each fails when that line of mail.py
is typed wrongly (checked by hand-applied mutations and mutmut)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import mail
from common.layers import coord_map

SIZE = 64  # 4 x 4 patches of the tiny ViLT (P = 16): every test stays well under a second


def _model(**changes) -> mail.MaIL:
    cfg = dataclasses.replace(mail.CONFIGS["tiny"], **({"image_size": SIZE} | changes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return mail.MaIL(cfg)


def _batch(model: mail.MaIL, n: int = 2) -> dict:
    base = data.ShapesDataset("val", 4, SIZE, 0, instances=True)
    prep = data.Preprocess(model.input_spec, model.tokenizer, candidates=True)
    items = [dict(prep(base[i]), index=i) for i in range(n)]
    return data.to_device(data.collate(items, model.tokenizer.pad_id), "cpu", model.input_spec)


@pytest.fixture(scope="module")
def model():
    return _model().eval()


@pytest.fixture(scope="module")
def batch(model):
    return _batch(model)


def _vilt_input(model, batch) -> torch.Tensor:
    """z^0, the sequence the transformer blocks receive (Eq. 4)."""
    seen = []
    hook = model.encoder.vilt.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(**model.inputs_from(batch))
    hook.remove()
    return seen[0]


def test_eq4_mask_tokens_are_patch_projection_plus_position_plus_t_m(model, batch):
    """v_M + t_M: each kept patch of each valid candidate, projected by the mask conv, plus the
    position of the image patch at its place and the mask type t_M; candidates in order, each
    one's valid-area patches in raster order, first in z^0 = [v_M + t_M; v_I + t_I; v_L + t_L]."""
    vilt, enc, P = model.encoder.vilt, model.encoder, model.encoder.vilt.patch_size
    z = _vilt_input(model, batch)
    h = w = SIZE // P
    _, _, pos = vilt.embed_image(batch["image"])  # (B, N, d)
    masks = batch["cand_masks"] & batch["cand_valid"][:, :, None, None]
    _, area = enc.mask_embed(masks, batch["cand_valid"])  # (B, K, h, w)
    for b in range(len(z)):
        want = []
        for k in range(masks.shape[1]):
            for i in range(h):
                for j in range(w):
                    if area[b, k, i, j]:
                        patch = masks[b, k, i * P : (i + 1) * P, j * P : (j + 1) * P].float()
                        token = (enc.mask_embed.proj.weight[:, 0] * patch).sum((-2, -1))
                        want.append(token + enc.mask_embed.proj.bias + pos[b, i * w + j]
                                    + enc.mask_type[0, 0])
        want = torch.stack(want)
        assert torch.allclose(z[b, : len(want)], want, atol=1e-5)
        # then v_I + t_I: ViLT's class token, then the image patches
        img, _, _ = vilt.embed_image(batch["image"][b : b + 1])
        n = int(area.flatten(1).sum(1).max())
        assert torch.allclose(z[b, n : n + 1 + h * w], img[0], atol=1e-5)
    # and the words last, with the text type t_L
    words = vilt.embed_text(batch["text"])
    assert torch.allclose(z[:, -words.shape[1] :], words, atol=1e-5)


def test_eq4_type_embeddings_differ_per_modality(model):
    """t_M is its own parameter (initialised as t_I), t_I and t_L are ViLT's two types."""
    vilt = model.encoder.vilt
    assert isinstance(model.encoder.mask_type, torch.nn.Parameter)
    assert not torch.equal(vilt.type_embed.weight[0], vilt.type_embed.weight[1])


def test_sec32_valid_area_tokens_only_and_padding_never_attended(model, batch):
    """N' = sum_k H_k W_k / P^2 tokens: only the valid areas enter; padded ones are masked."""
    seen = []
    hook = model.encoder.vilt.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    with torch.no_grad():
        model(**model.inputs_from(batch))
    hook.remove()
    keep = seen[0]
    masks = batch["cand_masks"] & batch["cand_valid"][:, :, None, None]
    _, area = model.encoder.mask_embed(masks, batch["cand_valid"])
    per_image = area.flatten(1).sum(1)  # N' of each image
    n = int(per_image.max())
    for b in range(len(keep)):
        assert keep[b, :n].sum() == per_image[b]  # its own N', the rest padding
        assert keep[b, : int(per_image[b])].all()


def test_sec32_output_split_f_m_zero_outside_valid_area(model, batch):
    """z^D split back into F_M^k on the patch grid: zero off each candidate's valid area."""
    with torch.no_grad():
        f_i, f_m = model.encoder(batch["image"], batch["text"], batch["text_mask"],
                                 batch["cand_masks"], batch["cand_valid"], None)
    _, area = model.encoder.mask_embed(batch["cand_masks"], batch["cand_valid"])
    assert f_i.shape[-2:] == f_m.shape[-2:] == (SIZE // 16, SIZE // 16)
    assert (f_m.abs().sum(2)[~area] == 0).all() and (f_m.abs().sum(2)[area] > 0).all()


def test_eq6_score_mlp_is_two_layers_with_relu(model):
    """s_k = MLP(f_k): Linear(d, d), ReLU, Linear(d, 1)."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, model.encoder.vilt.dim, generator=g)
    net = model.score.net
    want = F.linear(F.relu(F.linear(f, net[0].weight, net[0].bias)), net[2].weight, net[2].bias)
    assert torch.allclose(model.score(f), want, atol=1e-6)


def test_eq6_selection_takes_the_argmax_candidates_mask_features(model):
    """rho = argmax_k s_k over valid candidates, F_M^rho its features; padding scores -inf."""
    g = torch.Generator().manual_seed(1)
    B, K, d, h, w, P = 2, 3, model.encoder.vilt.dim, 2, 2, model.encoder.vilt.patch_size
    f_i = torch.randn(B, d, h, w, generator=g)
    f_m = torch.randn(B, K, d, h, w, generator=g)
    masks = torch.rand(B, K, h * P, w * P, generator=g) > 0.5
    valid = torch.tensor([[True, True, False], [True, True, True]])
    feat, scores, rho = model.select(f_i, f_m, masks, valid)
    f_k = mail.masked_average_pool(f_i, masks, P)
    want = model.score(f_k)[..., 0].masked_fill(~valid, float("-inf"))
    assert torch.allclose(scores, want, atol=1e-6) and torch.equal(rho, want.argmax(1))
    for b in range(B):
        assert torch.equal(feat[b], f_m[b, rho[b]])


def test_eq7_select_loss_is_cross_entropy_at_the_max_iou_candidate_weighted_0_1(model, batch):
    model.train()
    with torch.no_grad():
        out = model(**model.inputs_from(batch), target=batch["mask"])
    model.eval()
    t = batch["mask"][:, 0] > 0.5
    for b in range(len(t)):
        ious = [((m & t[b]).sum() / (m | t[b]).sum()).item() if v else -1
                for m, v in zip(batch["cand_masks"][b], batch["cand_valid"][b])]
        alpha = int(np.argmax(ious))
        s = out["mask_scores"][b]
        want = -(s[alpha] - torch.logsumexp(s[batch["cand_valid"][b]], 0))
        assert abs(float(want) - _per_sample_select(out, batch, b)) < 1e-5
    assert torch.allclose(out["loss"], out["loss_focal"] + out["loss_dice"]
                          + 0.1 * out["loss_select"], atol=1e-6)


def _per_sample_select(out, batch, b) -> float:
    alpha = mail.best_candidate(batch["cand_masks"], batch["cand_valid"], batch["mask"])
    return float(F.cross_entropy(out["mask_scores"][b : b + 1], alpha[b : b + 1]))


def test_eq8_head_input_is_reduced_f_i_then_f_m_rho_then_coordinates(model, batch):
    """F^ = Concat(conv1x1(F_I), conv1x1(F_M^rho), O), channels d/r, d/r, 2, in that order."""
    seen = []
    hook = model.head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(**model.inputs_from(batch))
        f_i, f_m = model.encoder(batch["image"], batch["text"], batch["text_mask"],
                                 batch["cand_masks"], batch["cand_valid"], None)
    hook.remove()
    f_hat, B = seen[0], len(f_i)
    r = model.encoder.vilt.dim // model.cfg.reduction
    assert f_hat.shape[1] == 2 * r + 2
    f_rho = f_m[torch.arange(B), out["selected"]]
    assert torch.allclose(f_hat[:, :r], model.reduce_i(f_i), atol=1e-5)
    assert torch.allclose(f_hat[:, r : 2 * r], model.reduce_m(f_rho), atol=1e-5)
    assert torch.equal(f_hat[:, 2 * r :], coord_map(B, *f_i.shape[-2:]))


def test_sec33_head_blocks_conv_bn_relu_upsample_then_1x1(model):
    """log2(P) x [3x3 conv + BN + ReLU + 2x bilinear], then a 1x1 conv to one channel."""
    head = model.head
    assert len(head.blocks) == int(math.log2(model.encoder.vilt.patch_size))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, head.blocks[0][0].in_channels, 2, 3, generator=g)
    want = x
    for conv, bn, _, _ in head.blocks:
        want = F.conv2d(want, conv.weight, padding=1)
        want = F.batch_norm(want, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
        want = F.interpolate(F.relu(want), scale_factor=2, mode="bilinear", align_corners=False)
    want = F.conv2d(want, head.out.weight, head.out.bias)
    with torch.no_grad():
        got = head(x)
    assert got.shape == (2, 1, 2 * 16, 3 * 16) and torch.allclose(got, want, atol=1e-5)


def test_sec33_mask_loss_is_focal_not_bce(model, batch):
    """Focal loss (alpha 0.25, gamma 2; Lin et al.) on the mask logits, plus dice."""
    model.train()
    with torch.no_grad():
        out = model(**model.inputs_from(batch), target=batch["mask"])
    model.eval()
    p, t = torch.sigmoid(out["mask_logits"]), batch["mask"]
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = 0.25 * t + 0.75 * (1 - t)
    focal = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t.clamp(min=1e-12))).mean()
    assert torch.allclose(out["loss_focal"], focal, rtol=1e-4)
    inter, total = (p * t).flatten(1).sum(1), (p + t).flatten(1).sum(1)
    dice = (1 - (2 * inter + 1) / (total + 1)).mean()
    assert torch.allclose(out["loss_dice"], dice, rtol=1e-5)


def test_focal_loss_averages_over_real_pixels_only():
    """ViLT setting: an image's focal loss does not depend on the padding its batch adds."""
    model = _model(image_size=48, max_size=80).train()
    base = data.ShapesDataset("val", 4, 80, 0, instances=True)
    prep = data.Preprocess(model.input_spec, model.tokenizer, candidates=True)
    wide = dict(base[0])
    wide = {**wide, "image": wide["image"][:48], "mask": wide["mask"][:48],
            "instances": wide["instances"][:, :48]}  # 48 x 80
    square = dict(base[1])  # resized to 48 x 48, padded to 48 x 80 beside `wide`
    collate = lambda xs: data.to_device(data.collate(
        [dict(prep(x), index=i) for i, x in enumerate(xs)], model.tokenizer.pad_id), "cpu",
        model.input_spec)
    alone, pair = collate([square]), collate([square, wide])
    assert pair["image"].shape[-1] > alone["image"].shape[-1]
    with torch.no_grad():
        a = model(**model.inputs_from(alone), target=alone["mask"])
        b = model(**model.inputs_from(pair), target=pair["mask"])
    real = pair["image_mask"]
    logits, target = b["mask_logits"][:, 0][real], pair["mask"][:, 0][real]
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    want = (-(0.25 * target + 0.75 * (1 - target)) * (1 - p_t) ** 2
            * torch.log(p_t.clamp(min=1e-12))).mean()
    assert torch.allclose(b["loss_focal"], want, rtol=1e-4)
    assert a["loss_focal"] > 0


def test_sec41_default_candidates_are_a_detectors_never_the_annotations():
    """The synthetic data's default candidates for MaIL (data.candidate_source) are simulated
    detections: no candidate equals an annotated instance, few are near-exact."""
    source = data.candidate_source("shapes")
    assert source == "simulated"
    ds = data.build_dataset("shapes", "val", shapes_size=24, shapes_image_size=128,
                            candidates=source, max_candidates=mail.CONFIGS["tiny"].max_candidates,
                            min_score=mail.CONFIGS["tiny"].min_score)
    plain = data.ShapesDataset("val", 24, 128, 0, instances=True)
    best = []
    for i in range(len(ds)):
        cands, annotated = ds[i]["instances"], plain[i]["instances"]
        assert not any(np.array_equal(c, a) for c in cands for a in annotated)
        t = ds[i]["mask"]
        best.append(max(((c & t).sum() / (c | t).sum() for c in cands), default=0.0))
    assert np.mean(np.array(best) >= 0.95) < 0.2  # not the annotations with a pixel changed


def test_forward_contract(model, batch):
    """Inputs by name, shapes and dtypes; outputs and loss terms."""
    assert model.input_names == ("image", "text", "text_mask", "cand_masks", "cand_valid")
    inputs = model.inputs_from(batch)
    B, K = batch["cand_valid"].shape
    assert inputs["image"].shape == (B, 3, SIZE, SIZE) and inputs["image"].dtype == torch.float32
    assert inputs["text"].dtype == torch.long and inputs["text_mask"].dtype == torch.bool
    assert inputs["cand_masks"].shape == (B, K, SIZE, SIZE)
    assert inputs["cand_masks"].dtype == torch.bool and inputs["cand_valid"].dtype == torch.bool
    model.train()
    with torch.no_grad():
        out = model(**inputs, target=batch["mask"])
    model.eval()
    assert out["mask_logits"].shape == (B, 1, SIZE, SIZE)
    assert out["mask_scores"].shape == (B, K) and out["selected"].shape == (B,)
    assert {"loss", "loss_focal", "loss_dice", "loss_select"} <= set(out)
    assert all(out[k].dim() == 0 for k in ("loss", "loss_focal", "loss_dice", "loss_select"))
