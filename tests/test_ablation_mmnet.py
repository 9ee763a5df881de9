"""MMNet's ablation switches (Sec. 4.4, Tables 2-4): each row of ABLATIONS builds on `tiny`,
trains, and removes exactly the part its name says; the default is the full model."""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import build, make_batch

import mmnet
from common.runconfig import parse_value

SWITCHES = ("multi_mask_projector", "query_estimator", "global_visual_feature")
# the parameters each switch removes (Table 3's single mask removes none: it reuses them all)
REMOVED = {"query_estimator": ("estimator.",),
           "global_visual_feature": ("generator.w_t.", "generator.w_vg.", "project.vg."),
           "multi_mask_projector": ()}


def up(y: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


def test_default_is_the_full_model():
    for name, cfg in mmnet.CONFIGS.items():
        assert all(getattr(cfg, s) is True for s in SWITCHES), name
    assert mmnet.CONFIGS["paper"].num_queries == 24  # Table 2's best row
    model = build("mmnet")
    names = {n for n, _ in model.named_parameters()}
    for prefixes in REMOVED.values():
        assert all(any(n.startswith(p) for n in names) for p in prefixes)
    assert model.cfg.num_queries > 1


def test_ablations_are_the_papers_rows_as_settable_overrides():
    rows = mmnet.ABLATIONS
    assert {k for k in rows if k.startswith("N_q=") and "w/o" not in k} == {
        f"N_q={n}" for n in (1, 2, 4, 8, 16, 24, 32)}  # Table 2
    assert {k for k in rows if "MMP" in k} == {f"N_q={n} w/o MMP" for n in (24, 16, 8)}  # Table 3
    assert {"w/o f_vg", "w/o MQE", "w/o f_vg, w/o MQE"} <= set(rows)  # Table 4
    tiny = mmnet.CONFIGS["tiny"]
    for name, overrides in rows.items():
        for field, value in overrides.items():
            default = getattr(tiny, field)  # a field of the config
            assert isinstance(value, (bool, int)) and type(value) is type(default), (name, field)
            assert parse_value(str(value), default) == value  # what --set gives back


@pytest.mark.parametrize("name", list(mmnet.ABLATIONS),
                         ids=[re.sub(r"[^0-9A-Za-z]+", "-", k) for k in mmnet.ABLATIONS])
def test_every_ablation_row_trains_on_tiny(name):
    overrides = mmnet.ABLATIONS[name]
    model = build("mmnet", **overrides)
    batch = make_batch(model, n=2)
    model.train()
    out = model(**model.inputs_from(batch), target=batch["mask"])
    assert out["mask_logits"].shape == batch["mask"].shape == (2, 1, 96, 96)
    Q = overrides["num_queries"]
    masks = 1 if overrides.get("multi_mask_projector") is False else Q
    assert out["query_masks"].shape == (2, masks, 48, 48)
    assert out["query_scores"].shape == out["word_attn"].shape[:2] == (2, Q)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    # every parameter the row builds takes part: a gradient, finite, not zero everywhere; with
    # N_q = 1, Eq. (15)'s softmax over one query is 1 whatever the estimator computes
    # the MHSA's output bias of Eq. (15) is added to every query, so it shifts every W_s logit
    # alike and the softmax drops it: its gradient is zero in exact arithmetic, for any N_q
    idle = ("estimator.",) if Q == 1 else ("estimator.attn.to_out.bias",)
    bad = [n for n, p in model.named_parameters() if not n.startswith(idle) and (
           p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0)]
    assert not bad, bad[:8]
    if Q == 1:
        assert (out["query_scores"] == 1).all()


@pytest.mark.parametrize("switch", SWITCHES)
def test_a_switch_removes_only_its_own_part(switch):
    """With the full model's weights loaded, the ablated model misses exactly the parameters of
    the switched-off part, and what comes before that part is computed as in the full model."""
    full = build("mmnet").eval()
    ablated = build("mmnet", **{switch: False}).eval()
    missing, unexpected = ablated.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    assert sorted(unexpected) == sorted(k for k in full.state_dict()
                                        if k.startswith(REMOVED[switch]))
    batch = make_batch(full, n=2)
    with torch.no_grad():
        a, b = full(**full.inputs_from(batch)), ablated(**ablated.inputs_from(batch))
    assert a["mask_logits"].shape == b["mask_logits"].shape
    if switch != "global_visual_feature":  # the queries are unchanged (Eq. 6-10)
        assert torch.allclose(a["word_attn"], b["word_attn"])
    if switch == "multi_mask_projector":  # the estimator's scores are unchanged (Eq. 15)
        assert torch.allclose(a["query_scores"], b["query_scores"])
        return  # the prediction: next test
    if switch == "query_estimator":  # every mask is unchanged (Eq. 14)
        assert torch.allclose(a["query_masks"], b["query_masks"], atol=1e-6)
    assert not torch.allclose(a["mask_logits"], b["mask_logits"], atol=1e-4)


def _train_mode_outputs(model, batch):
    """Forward in train mode without gradients: BatchNorm normalises by the batch as in training
    (at initialisation its running statistics are the identity); tiny has no dropout, so the
    pass is deterministic and two models with the same weights are comparable."""
    model.train()
    with torch.no_grad():
        return model(**model.inputs_from(batch))


@pytest.mark.parametrize("row", ["N_q=24 w/o MMP", "N_q=16 w/o MMP", "N_q=8 w/o MMP", "w/o MQE",
                                 "w/o f_vg", "w/o f_vg, w/o MQE"])
def test_table3_and_table4_rows_differ_from_the_full_model_on_the_same_weights(row):
    """Each Table 3/4 row is another function of the same weights, by a clear margin: labels
    flip, not rounding. The estimator's W_s is drawn larger so that the scores are not uniform
    (at initialisation they nearly are, which would hide what w/o MQE removes)."""
    overrides = mmnet.ABLATIONS[row]
    torch.manual_seed(0)
    full = build("mmnet", num_queries=overrides["num_queries"])
    with torch.no_grad():
        full.estimator.w_s.weight.normal_(0, 1)
    ablated = build("mmnet", **overrides)
    ablated.load_state_dict(full.state_dict(), strict=False)
    batch = make_batch(full, n=2)
    a, b = _train_mode_outputs(full, batch), _train_mode_outputs(ablated, batch)
    diff = (a["mask_logits"] - b["mask_logits"]).abs()
    flipped = ((a["mask_logits"] > 0) != (b["mask_logits"] > 0)).float().mean()
    assert diff.max() > 0.3 and flipped > 0, (row, diff.max().item(), flipped.item())


def test_on_logits_without_eq14s_sigma_the_mmp_would_be_its_own_ablation():
    """Why Eq. (16) mixes probabilities by default: the dynamic convolution is linear in its
    kernel and bias, W_p is linear (Sec. 3.4's "linear layer") and the scores sum to 1, so on
    logits the S_q-weighted sum of the masks is exactly the mask of the S_q-weighted query,
    Table 3's ablation; Eq. (14)'s sigma or Eq. (16) on probabilities each break that."""
    torch.manual_seed(0)
    C, Q = 8, 5
    f_s, f_q = torch.randn(2, C, 4, 4), torch.randn(2, Q, C)
    scores = torch.softmax(torch.randn(2, Q), 1)  # S_q
    q_bar = torch.einsum("bq,bqc->bc", scores, f_q)[:, None]  # w/o MMP's one query
    for kernel_relu in (False, True):
        projector = mmnet.MultiMaskProjector(C, kernel_relu=kernel_relu).eval()
        with torch.no_grad():
            masks, single = projector(f_s, f_q), projector(f_s, q_bar)
            on_logits = torch.einsum("bq,bqhw->bhw", scores, masks)[:, None]
            on_probs = mmnet.mix_masks(masks, scores)
        assert torch.allclose(on_logits, single, atol=1e-5) is not kernel_relu
        assert (on_probs - single).abs().max() > 0.1
    full = build("mmnet", mix_probabilities=False)
    ablated = build("mmnet", mix_probabilities=False, multi_mask_projector=False)
    ablated.load_state_dict(full.state_dict())
    batch = make_batch(full, n=2)
    a, b = _train_mode_outputs(full, batch), _train_mode_outputs(ablated, batch)
    assert torch.allclose(a["mask_logits"], b["mask_logits"], atol=1e-4)


def test_without_mmp_one_mask_comes_from_the_score_weighted_query():
    """Table 3: the estimator's scores weight the queries themselves, and the one aggregated
    query gives the one mask through the projector (Eq. 14), which is the prediction."""
    model = build("mmnet", multi_mask_projector=False).eval()
    batch = make_batch(model, n=2)
    seen = {}
    model.generator.register_forward_hook(lambda m, i, o: seen.update(f_q=o[0]))
    model.projector.register_forward_hook(lambda m, i, o: seen.update(inputs=i))
    with torch.no_grad():
        out = model(**model.inputs_from(batch))
        f_s, query = seen["inputs"]
        f_q_bar = torch.einsum("bq,bqc->bc", out["query_scores"], seen["f_q"])
        mask = model.projector(f_s, f_q_bar[:, None])
    assert query.shape == (2, 1, model.cfg.dim)
    assert torch.allclose(query[:, 0], f_q_bar, atol=1e-6)
    assert torch.allclose(out["query_masks"], mask, atol=1e-6)
    assert torch.allclose(out["mask_logits"], up(mask, (96, 96)), atol=1e-5)
    assert len(model.vis_panels(out, 0)) == 1


@pytest.mark.parametrize("probs", [True, False])
def test_without_mqe_the_masks_count_alike(probs):
    """Table 4, w/o MQE: on probabilities (default) the mean of the mask probabilities, so that
    y stays a probability; on logits the plain sum of the logits ("directly adding")."""
    model = build("mmnet", query_estimator=False, mix_probabilities=probs).eval()
    assert model.estimator is None
    batch = make_batch(model, n=2)
    with torch.no_grad():
        out = model(**model.inputs_from(batch))
    Q, masks = model.cfg.num_queries, out["query_masks"]
    assert (out["query_scores"] == (1 / Q if probs else 1)).all()
    if probs:
        y = masks.sigmoid().mean(1, keepdim=True)
        y = torch.log(y) - torch.log1p(-y)  # its logit
    else:
        y = masks.sum(1, keepdim=True)  # a sum, not a mean
    assert torch.allclose(out["mask_logits"], up(y, (96, 96)), atol=1e-4)
    assert "w/o MQE" in model.vis_panels(out, 0)[-1][0]


def test_without_fvg_the_queries_attend_over_the_text_features_themselves():
    """Table 4, w/o f_vg: Eq. (8) removed, F_t in F_tv's place in Eq. (9-10), F_vg not needed."""
    torch.manual_seed(0)
    C, Cw, Q, side = 8, 6, 3, 4
    gen = mmnet.MultiQueryGenerator(C, Cw, Q, num_pixels=side * side, global_visual=False).eval()
    assert not hasattr(gen, "w_t") and not hasattr(gen, "w_vg")
    assert gen.w_a[0].in_features == gen.w_tv[0].in_features == Cw  # they read F_t
    f_v2, f_v3, f_v4 = (torch.randn(2, C, s, s) for s in (2 * side, side, side // 2))
    words = torch.randn(2, 5, Cw)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        f_q, attn = gen(f_v2, f_v3, f_v4, None, words, text_mask)
        f_vd = gen.to_queries(gen.dense(f_v2, f_v3, f_v4)).flatten(2)
        logits = torch.einsum("bqc,blc->bql", gen.w_vd(f_vd), gen.w_a(words))  # Eq. (9) on F_t
        ref = torch.softmax(logits.masked_fill(~text_mask[:, None], float("-inf")), 2)
    assert torch.allclose(attn, ref, atol=1e-6)
    assert torch.allclose(f_q, ref @ gen.w_tv(words), atol=1e-5)  # Eq. (10) on F_t
    proj = mmnet.VisualProjection(dict(x2=4, x3=4, x4=4, z=4), C, vit=True, global_feature=False)
    assert proj.vg is None and proj(*(torch.randn(1, 4, 4, 4),) * 3, torch.randn(1, 4))[3] is None


def test_without_mmp_and_without_mqe_is_refused():
    """The paper's single mask weights the queries by the estimator; it gives no other rule."""
    cfg = dataclasses.replace(mmnet.CONFIGS["tiny"], multi_mask_projector=False,
                              query_estimator=False)
    with pytest.raises(ValueError, match="query_estimator"):
        mmnet.MMNet(cfg)
