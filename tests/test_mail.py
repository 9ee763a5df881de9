"""MaIL-specific checks: masked average pooling (Eq. 6), the select-loss target (Eq. 7), what
each loss trains, padded candidates, mask-token valid areas, the ViLT encoder against
transformers' ViltModel, loading a ViLT folder written by save_pretrained, the ViLT (384/640)
input setting and its batch-independent output, the K bound, candidate files and the
visualisation panels. The shared contract checks are in test_models.py; the candidate sources
(simulated detector, Mask R-CNN writer) in test_proposals.py; the ablation switches (Sec. 4.3) in
test_ablation_mail.py."""

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import build, make_batch, nearest_patch_tokens, vilt_padded_outputs

import data
import mail
import train
from common.candidates import encode_candidates, load_candidates
from common.checkpoint import build_model_from_checkpoint
from common.encoders import VILT_ARCHS, ViLTEncoder
from common.layers import coord_map, extend_border, patch_coord_map, real_patches
from common.refer import decode_segmentation
from common.runconfig import build_config
from common.tokenizers import WordPieceTokenizer


@pytest.fixture(scope="module")
def model():
    return build("mail")


@pytest.fixture(scope="module")
def batch(model):
    return make_batch(model, n=3)


def test_masked_average_pool_equals_a_loop():
    g = torch.Generator().manual_seed(0)
    P, h, w = 4, 3, 5
    f_i = torch.randn(2, 6, h, w, generator=g)
    masks = torch.rand(2, 3, h * P, w * P, generator=g) > 0.6
    masks[1, 2] = False  # an empty mask pools to zero
    masks[0, 1] = False
    masks[0, 1, 5, 6] = True  # one pixel: 1/16 of a patch, the mean is that patch's feature
    got = mail.masked_average_pool(f_i, masks, P)
    for b in range(2):
        pixels = f_i[b].repeat_interleave(P, 1).repeat_interleave(P, 2)  # F_I at pixels (nearest)
        for k in range(3):
            m = masks[b, k]
            want = pixels[:, m].mean(1) if m.any() else torch.zeros(6)
            assert torch.allclose(got[b, k], want, atol=1e-5)


def test_best_candidate_is_the_max_iou_one():
    target = torch.zeros(3, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1  # 16 pixels
    cands = torch.zeros(3, 3, 8, 8, dtype=torch.bool)
    cands[0, 0, 2:6, 2:4] = True  # IoU 8/16
    cands[0, 1, 1:7, 1:7] = True  # IoU 16/36
    cands[0, 2, 2:6, 2:5] = True  # IoU 12/16: the best
    cands[1, 0, 2:6, 2:6] = True  # exact, but padded
    cands[1, 1, 0:3, 0:3] = True  # IoU 1/24
    cands[2, :, 7:, 7:] = True  # no overlap at all
    valid = torch.tensor([[True] * 3, [False, True, True], [True] * 3])
    alpha = mail.best_candidate(cands, valid, target)
    assert alpha.tolist() == [2, 1, mail.IGNORE]


def test_select_loss_targets_the_max_iou_candidate(model, batch):
    model.train()
    out = model(**model.inputs_from(batch), target=batch["mask"])
    # the synthetic ground truth is one of the candidates, so alpha is its index
    alpha = mail.best_candidate(batch["cand_masks"], batch["cand_valid"], batch["mask"])
    assert torch.equal(alpha, batch["target_index"])
    logp = torch.log_softmax(out["mask_scores"], 1)
    want = -logp[torch.arange(len(alpha)), alpha].mean()
    assert torch.allclose(out["loss_select"], want, atol=1e-6)
    total = out["loss_focal"] + out["loss_dice"] + 0.1 * out["loss_select"]
    assert torch.allclose(out["loss"], total)


def test_no_select_target_gives_zero_loss_and_finite_gradients(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    target = torch.zeros_like(batch["mask"])
    target[..., :2, :2] = 1  # a corner no shape covers
    out = model(**model.inputs_from(batch), target=target)
    assert out["loss_select"].item() == 0.0
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_each_loss_trains_the_parameters_the_docstring_names(model, batch):
    """The score MLP learns from lambda L_select alone (argmax is not differentiable); the head
    and the 1x1 reductions from focal + dice alone; both reach the encoder's mask embedding."""
    model.train()
    grads = {}
    for name in ("loss_select", "loss_focal"):
        model.zero_grad(set_to_none=True)
        model(**model.inputs_from(batch), target=batch["mask"])[name].backward()
        grads[name] = {n: p.grad is not None and bool(p.grad.abs().sum() > 0)
                       for n, p in model.named_parameters()}
    select, mask = grads["loss_select"], grads["loss_focal"]
    for n in select:
        if n.startswith("score."):
            assert select[n] and not mask[n], n
        if n.startswith(("head.", "reduce_")):
            assert mask[n] and not select[n], n
    assert select["encoder.mask_embed.proj.weight"] and mask["encoder.mask_embed.proj.weight"]
    assert select["encoder.mask_type"] and mask["encoder.mask_type"]


def test_padded_candidates_change_nothing(model, batch):
    model.eval()
    padded = dict(batch)
    B, K, H, W = batch["cand_masks"].shape
    junk = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(1)) > 0.3
    padded["cand_masks"] = torch.cat([batch["cand_masks"], junk], 1)
    padded["cand_valid"] = torch.cat([batch["cand_valid"], torch.zeros(B, 3, dtype=torch.bool)], 1)
    with torch.no_grad():
        a = model(**model.inputs_from(batch))
        b = model(**model.inputs_from(padded))
    assert torch.allclose(a["mask_logits"], b["mask_logits"], atol=1e-5)
    assert torch.allclose(a["mask_scores"], b["mask_scores"][:, :K], atol=1e-5)
    assert torch.isneginf(b["mask_scores"][:, K:]).all()
    assert torch.equal(a["selected"], b["selected"])


def test_padded_candidate_is_never_selected(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**model.inputs_from(batch))
    valid = batch["cand_valid"]
    assert valid[torch.arange(len(valid)), out["selected"]].all()
    assert torch.equal(torch.isneginf(out["mask_scores"]), ~valid)


def test_empty_candidates_give_no_mask_tokens_and_still_predict(model, batch):
    """eval.py's single-image prediction has no instances: one empty candidate per image."""
    model.eval()
    empty = dict(batch)
    empty["cand_masks"] = torch.zeros_like(batch["cand_masks"][:, :1])
    empty["cand_valid"] = torch.ones_like(batch["cand_valid"][:, :1])
    with torch.no_grad():
        out = model(**model.inputs_from(empty), target=batch["mask"])
    assert torch.isfinite(out["mask_logits"]).all() and out["loss_select"].item() == 0.0
    assert (out["selected"] == 0).all()


def test_valid_area_is_the_bounding_box_of_touched_patches():
    embed = mail.MaskEmbedding(dim=8, patch_size=4)
    masks = torch.zeros(1, 3, 16, 16, dtype=torch.bool)
    masks[0, 0, 1, 1] = masks[0, 0, 9, 13] = True  # touches patches (0, 0) and (2, 3)
    masks[0, 1, 5:7, 5:7] = True  # one patch, (1, 1)
    masks[0, 2, :, :] = True  # a padded candidate
    valid = torch.tensor([[True, True, False]])
    tokens, area = embed(masks, valid)
    assert tokens.shape == (1, 3, 16, 8)
    box = torch.zeros(4, 4, dtype=torch.bool)
    box[0:3, 0:4] = True
    assert torch.equal(area[0, 0], box)
    one = torch.zeros(4, 4, dtype=torch.bool)
    one[1, 1] = True
    assert torch.equal(area[0, 1], one)
    assert not area[0, 2].any()


def _copy_to_hf(enc: ViLTEncoder, hf) -> None:
    names = {"text_embed.": "embeddings.text_embeddings.",
             "patch_embed.": "embeddings.patch_embeddings.projection.",
             "cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
             "type_embed.": "embeddings.token_type_embeddings.", "blocks.": "encoder.layer.",
             "norm.": "layernorm."}
    state = {}
    for k, v in enc.state_dict().items():
        prefix = next(p for p in names if k.startswith(p))
        state[names[prefix] + k[len(prefix):]] = v
    hf.load_state_dict(state, strict=True)


def test_vilt_encoder_matches_transformers_vilt():
    """Same weights, same output as ViltModel, padded images included (ViLT shuffles its patch
    tokens, so patches are compared as sets)."""
    from transformers import ViltConfig, ViltModel

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = ViLTEncoder("tiny", None, vocab_size=300).eval()
    hf = ViltModel(ViltConfig(vocab_size=300, **VILT_ARCHS["tiny"]), add_pooling_layer=False)
    _copy_to_hf(enc, hf.eval())
    ours, ref, keep = vilt_padded_outputs(enc, hf, 300, 7, 5, (128, 96), (100, 70))
    assert torch.allclose(ours[:, :8], ref[:, :8], atol=1e-5)  # words and the class token
    for b in range(2):  # 7 x 5 real patches in the second image
        real, nearest = nearest_patch_tokens(ours, ref, keep, b, 7)
        assert (real - nearest).norm(dim=1).max() < 1e-4  # the nearest token's distance


def _save_vilt(folder, vocab_words: int = 120, **changes):
    from transformers import ViltConfig, ViltModel

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(vocab_words)]
    words += ["the", "red", "circle", "big", "blue", "square", "left", "of", "shape"]
    spec = VILT_ARCHS["tiny"] | changes
    vilt = ViltModel(ViltConfig(vocab_size=len(words), **spec), add_pooling_layer=False)
    vilt.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return vilt


def test_vilt_checkpoint_from_save_pretrained_loads(tmp_path):
    vilt = _save_vilt(tmp_path)
    cfg = dataclasses.replace(mail.CONFIGS["tiny"], image_weights=str(tmp_path))
    model = mail.MaIL(cfg)
    enc = model.encoder.vilt
    assert isinstance(model.tokenizer, WordPieceTokenizer)
    assert model.cfg.vocab == str(tmp_path / "vocab.txt")
    assert torch.equal(enc.blocks[3].output.dense.weight, vilt.encoder.layer[3].output.dense.weight)
    assert torch.equal(enc.text_embed.word_embeddings.weight,
                       vilt.embeddings.text_embeddings.word_embeddings.weight)
    assert torch.equal(enc.pos_embed, vilt.embeddings.position_embeddings)
    # the new mask pieces start from ViLT's: t_M = t_I, mask projection = RGB projection summed
    t_i = vilt.embeddings.token_type_embeddings.weight[1]
    assert torch.equal(model.encoder.mask_type[0, 0], t_i)
    rgb = vilt.embeddings.patch_embeddings.projection.weight
    assert torch.allclose(model.encoder.mask_embed.proj.weight, rgb.sum(1, keepdim=True))
    batch = make_batch(model, n=2)
    out = model(**model.inputs_from(batch), target=batch["mask"])
    assert torch.isfinite(out["loss"])
    # a checkpoint keeps the resolved vocabulary, so it rebuilds without the ViLT folder
    ckpt = dict(model_name="mail", config=dataclasses.asdict(model.cfg), model=model.state_dict())
    again, _, _ = build_model_from_checkpoint(ckpt)
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(model(**model.inputs_from(batch))["mask_logits"],
                           again(**again.inputs_from(batch))["mask_logits"])


def test_vilt_folder_problems_are_errors(tmp_path):
    _save_vilt(tmp_path, hidden_size=64)
    cfg = dataclasses.replace(mail.CONFIGS["tiny"], image_weights=str(tmp_path))
    with pytest.raises(ValueError, match="architecture"):
        mail.MaIL(cfg)
    (tmp_path / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        mail.MaIL(cfg)
    with pytest.raises(FileNotFoundError, match="Hugging Face folder"):
        ViLTEncoder("tiny", str(tmp_path / "config.json"))


def test_vilt_setting_pads_and_keeps_each_image_unchanged():
    """Shorter side / max longer side with patch-multiple padding (Sec. 4.1): an image's encoder
    features do not depend on the larger image it is batched with."""
    cfg = dataclasses.replace(mail.CONFIGS["tiny"], image_size=64, max_size=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mail.MaIL(cfg).eval()
    spec = model.input_spec
    assert spec.resize == "shorter" and spec.pad_multiple == 16
    prep = data.Preprocess(spec, model.tokenizer, candidates=True)
    base = data.ShapesDataset("val", 4, 96, 0)
    wide, tall = dict(base[0]), dict(base[1])
    wide = {**wide, "image": wide["image"][:60], "mask": wide["mask"][:60],
            "instances": wide["instances"][:, :60]}  # 60 x 96, padded to 64 x 96
    items = [prep(wide), prep(tall)]
    for i, it in enumerate(items):
        it["index"] = i
    pair = data.to_device(data.collate(items, model.tokenizer.pad_id), "cpu", spec)
    alone = data.to_device(data.collate(items[1:], model.tokenizer.pad_id), "cpu", spec)
    assert pair["image"].shape[-2:] == (64, 96) and alone["image"].shape[-2:] == (64, 64)
    with torch.no_grad():
        out = model(**model.inputs_from(pair))
        assert out["mask_logits"].shape == (2, 1, 64, 96)
        f_pair, _ = model.encoder(*[pair[k] for k in model.input_names[:5]], pair["image_mask"])
        f_alone, _ = model.encoder(*[alone[k] for k in model.input_names[:5]], alone["image_mask"])
    assert torch.allclose(f_pair[1, :, :, :4], f_alone[0], atol=1e-4)


def _vilt_setting_model():
    cfg = dataclasses.replace(mail.CONFIGS["tiny"], image_size=64, max_size=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return mail.MaIL(cfg).eval()


def test_vilt_setting_output_does_not_depend_on_the_batch():
    """Eq. (8)'s coordinate map spans each image's own patches and the head never sees the
    padding: an image's logits are the same alone and batched with a wider or a taller image,
    and the padding is background."""
    model = _vilt_setting_model()
    prep = data.Preprocess(model.input_spec, model.tokenizer, candidates=True)
    base = data.ShapesDataset("val", 4, 96, 0)
    crop = lambda s, rows, cols: {**s, "image": s["image"][:rows, :cols],
                                  "mask": s["mask"][:rows, :cols],
                                  "instances": s["instances"][:, :rows, :cols]}
    square = crop(base[0], 80, 80)  # resized to 64 x 64
    others = {"wide": crop(base[1], 60, 96), "tall": crop(base[2], 96, 60)}  # 64x96, 96x64
    batch = lambda samples: data.to_device(data.collate(
        [dict(prep(x), index=i) for i, x in enumerate(samples)], model.tokenizer.pad_id),
        "cpu", model.input_spec)  # normalised, padding 0
    alone = batch([square])
    with torch.no_grad():
        want = model(**model.inputs_from(alone))["mask_logits"][0]  # (1, 64, 64)
        for name, other in others.items():
            pair = batch([other, square])
            assert pair["image"].shape[-2:] == ((64, 96) if name == "wide" else (96, 64))
            got = model(**model.inputs_from(pair))["mask_logits"]
            assert torch.allclose(got[1, :, :64, :64], want, atol=1e-5), name
            outside = ~pair["image_mask"][:, None]
            assert outside.any() and (got[outside] == mail.PAD_LOGIT).all()


def test_coordinate_map_spans_each_images_own_patches():
    real = torch.zeros(2, 3, 4, dtype=torch.bool)
    real[0] = True
    real[1, :2, :3] = True
    got = patch_coord_map(real, torch.float32)
    assert torch.allclose(got[0], coord_map(1, 3, 4)[0])
    assert torch.allclose(got[1, :, :2, :3], coord_map(1, 2, 3)[0])
    assert not got[1, :, 2:].any() and not got[1, :, :, 3:].any()


def test_real_patches_and_border_extension_follow_each_images_real_area():
    """common.layers' padded-batch helpers: a patch is real if it holds one real pixel; the
    padding takes a copy of the image's last real row and column."""
    image_mask = torch.zeros(2, 12, 16, dtype=torch.bool)
    image_mask[0] = True
    image_mask[1, :5, :9] = True  # 5 x 9 real pixels: patch rows 0-1, columns 0-2 (P = 4)
    real = real_patches(image_mask, 4, 3, 4)  # (2, 3, 4)
    assert real[0].all() and real[1].nonzero().amax(0).tolist() == [1, 2]
    assert int(real[1].sum()) == 6
    x = torch.randn(2, 5, 3, 4)
    got = extend_border(x, real)
    assert torch.equal(got[0], x[0])
    assert torch.equal(got[1], x[1][:, [0, 1, 1]][:, :, [0, 1, 2, 2]])


def test_candidate_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    masks = rng.random((3, 20, 30)) > 0.5
    entries = encode_candidates(7, masks, scores=[0.2, 0.9, 0.6])
    entries += encode_candidates(8, masks[:1])
    path = tmp_path / "cands.json"
    path.write_text(json.dumps(entries))
    cands = load_candidates(str(path), min_score=0.5)
    assert sorted(cands) == [7, 8]
    assert [c["score"] for c in cands[7]] == [0.9, 0.6]  # best first, 0.2 dropped
    got = np.stack([decode_segmentation(c["segmentation"], 20, 30) for c in cands[7]])
    assert np.array_equal(got, masks[[1, 2]])
    path.write_text(json.dumps({"annotations": entries}))
    assert len(load_candidates(str(path), max_per_image=1)[7]) == 1
    path.write_text(json.dumps([{"image_id": 1}]))
    with pytest.raises(ValueError, match="segmentation"):
        load_candidates(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_candidates(str(path))


def test_vis_panels_show_scored_candidates_and_mark_the_selected(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**model.inputs_from(batch))
    for i in range(len(batch["cand_valid"])):
        panels = model.vis_panels(out, i)
        assert len(panels) == int(batch["cand_valid"][i].sum())
        assert sum("SELECTED" in title for title, _ in panels) == 1
        assert "SELECTED" in panels[0][0]  # the selected one has the largest score
        k = int(out["selected"][i])
        assert f"mask {k}:" in panels[0][0]
        assert f"s={out['mask_scores'][i, k]:.2f}" in panels[0][0]
        assert torch.equal(panels[0][1], batch["cand_masks"][i, k].float())
        probs = [float(t.split("p=")[1].split()[0]) for t, _ in panels]
        assert math.isclose(sum(probs), 1.0, abs_tol=0.05)


def test_vis_panels_crop_the_padding_of_a_non_square_image():
    """Fig. 5's panels align with the image: candidate masks are cut to the real (unpadded)
    rows and columns of `image_mask`, here 3 x 5 of a 6 x 8 padded input."""
    model = build("mail", image_size=64)
    real = torch.zeros(1, 6, 8, dtype=torch.bool)
    real[0, :3, :5] = True
    out = {"mask_scores": torch.tensor([[0.5, 2.0]]), "selected": torch.tensor([1]),
           "cand_masks": torch.rand(1, 2, 6, 8, generator=torch.Generator().manual_seed(0)) > 0.5,
           "image_mask": real}
    panels = model.vis_panels(out, 0)
    assert [m.shape for _, m in panels] == [(3, 5), (3, 5)]
    assert torch.equal(panels[0][1], out["cand_masks"][0, 1, :3, :5].float())
    del out["image_mask"]  # a square input without padding: the masks as they are
    assert [m.shape for _, m in model.vis_panels(out, 0)] == [(6, 8), (6, 8)]


def test_text_max_tokens_and_configs():
    assert mail.CONFIGS["paper"].max_tokens == 15 and mail.CONFIGS["paper-gref"].max_tokens == 20
    square = mail.CONFIGS["paper-416"]
    assert square.max_size is None and square.image_size == 416
    with torch.device("meta"):
        model = build("mail", "paper-416")
    assert model.input_spec.resize == "square" and model.input_spec.size == 416
    assert model.encoder.vilt.patch_size == 32 and model.encoder.vilt.dim == 768
    assert len(model.head.blocks) == 5  # log2(32)
    assert model.head.blocks[0][0].in_channels == 2 * 256 + 2  # Eq. (8): 768 / r twice, O


def test_candidate_bound_is_a_config_field_reachable_from_set():
    """K is bounded by config fields that the data pipeline applies (the model sees no scores)."""
    assert mail.CONFIGS["paper"].max_candidates == 20 and mail.CONFIGS["paper"].min_score == 0.05
    args = train.parse_args(["--model", "mail", "--set", "max_candidates=2",
                             "--set", "min_score=0.3"])
    cfg = build_config(mail, args)
    assert cfg.max_candidates == 2 and cfg.min_score == 0.3
    ds = data.build_dataset("shapes", "val", shapes_size=12, shapes_image_size=64,
                            candidates="simulated", max_candidates=cfg.max_candidates,
                            min_score=cfg.min_score)
    samples = [ds[i] for i in range(len(ds))]
    assert max(len(s["instances"]) for s in samples) == 2
    assert all((s["candidate_scores"] >= 0.3).all() for s in samples)


@pytest.mark.slow
def test_candidates_file_end_to_end(tmp_path):
    """--candidates replaces the annotated instances in train.py and eval.py (matched by image
    id; an image absent from the file gets one empty candidate, never the ground truth), and
    feeds single-image prediction."""
    shapes = data.ShapesDataset("train", 8, 64, 0)
    entries = []
    for i in range(0, 8, 2):  # odd images have no proposals; even ones lose their first shape
        entries += encode_candidates(i, shapes[i]["instances"][1:])
    path = tmp_path / "props.json"
    path.write_text(json.dumps(entries))
    ds = data.build_dataset("shapes", "train", shapes_size=8, shapes_image_size=64,
                            candidates=str(path))
    assert ds.sentence(3) == shapes.sentence(3)
    assert np.array_equal(ds[2]["instances"], shapes[2]["instances"][1:])
    assert ds[3]["instances"].shape == (0, 64, 64) and ds[2]["target_index"] == -1
    prep = data.Preprocess(mail.MaIL(mail.CONFIGS["tiny"]).input_spec, None, candidates=True)
    prep.tokenizer = lambda s: ([1, 2], False)
    assert not prep(ds[3])["cand_masks"].any()  # an empty candidate, not the ground truth

    out = str(tmp_path / "run")
    train.main(["--model", "mail", "--shapes-train-size", "8", "--shapes-eval-size", "8",
                "--shapes-image-size", "64", "--batch-size", "4", "--epochs", "1",
                "--candidates", str(path), "--out", out])
    import eval as eval_cli

    ckpt = str(tmp_path / "run" / "last.pt")
    got = eval_cli.main(["--checkpoint", ckpt])  # the training run's file by default
    assert got["val"]["n"] == 8
    image = tmp_path / "im.png"
    from PIL import Image

    Image.fromarray(shapes[0]["image"]).save(image)
    single = tmp_path / "one.json"
    single.write_text(json.dumps(encode_candidates(5, shapes[0]["instances"])))
    eval_cli.main(["--checkpoint", ckpt, "--image", str(image), "--text", "the red circle",
                   "--candidates", str(single), "--save-mask", str(tmp_path / "m.png")])
    assert Image.open(tmp_path / "m.png").size == (64, 64)
    with pytest.raises(ValueError, match="image-id"):
        eval_cli.main(["--checkpoint", ckpt, "--image", str(image), "--text", "the red circle",
                       "--candidates", str(path)])


# The paper's recipe per paper config (Sec. 4.1 unless said): image size / longer side,
# tokens, optimiser, lr, weight decay, warm-up, schedule, global batch, epochs, clipping, flips.
_RECIPE = dict(
    optimiser="AdamW",  # "We use AdamW [26] optimizer" (Sec. 4.1)
    lr=1e-4,  # "a base learning rate of 10^-4" (Sec. 4.1)
    weight_decay=1e-2,  # "weight decay of 10^-2" (Sec. 4.1)
    warmup=0.1,  # "warmed up for 10% of the total training steps" (Sec. 4.1)
    schedule="linear",  # "decayed linearly to zero for the rest of training" (Sec. 4.1)
    batch_size=128,  # "4 NVIDIA RTX3090 GPUs with a batch size of 128" (Sec. 4.1)
    epochs=10,  # "The training phase contains 10 epochs" (Sec. 4.1)
    clip_grad=0.0,  # no clipping is named in the paper
    hflip=False,  # no augmentation is named in the paper
)
PAPER_RECIPES = {
    # shorter edge 384, longer edge under 640 (Sec. 4.1, as ViLT [19]); 15 tokens for RefCOCO(+)
    "paper": dict(_RECIPE, image_size=384, max_size=640, max_tokens=15),
    # "resize all images to 416 x 416" (Sec. 4.1, the other setting, Tab. 1)
    "paper-416": dict(_RECIPE, image_size=416, max_size=None, max_tokens=15),
    # "20 for G-Ref" (Sec. 4.1)
    "paper-gref": dict(_RECIPE, image_size=384, max_size=640, max_tokens=20),
    # Tab. 2 variant 6: the same recipe, uni-modal weights (the recipe of that row is not given)
    "paper-unimodal": dict(_RECIPE, image_size=384, max_size=640, max_tokens=15),
}


def test_paper_configs_are_the_papers_recipe():
    assert set(PAPER_RECIPES) == {k for k in mail.CONFIGS if k.startswith("paper")}
    for name, recipe in PAPER_RECIPES.items():
        cfg = mail.CONFIGS[name]
        got = {k: getattr(cfg, k) for k in recipe if hasattr(cfg, k)}
        assert got == {k: v for k, v in recipe.items() if k in got}, name
        assert cfg.vilt_arch == "vilt-b32" and cfg.tokenizer == "wordpiece", name
    # optimiser and schedule: what configure_optimizers builds (the config's values, which
    # equal AdamW's and the schedule's defaults: another pair must be honoured too)
    other = build("mail", image_size=64, warmup=0.25, weight_decay=0.05)
    opt, sched = other.configure_optimizers(1e-4, total_steps=100)
    assert opt.param_groups[0]["weight_decay"] == 0.05
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 / 25)  # step 1 of a 25-step warm-up
    model = build("mail", image_size=64, warmup=_RECIPE["warmup"])  # tiny's net, paper's warm-up
    opt, sched = model.configure_optimizers(1e-4, total_steps=100)
    assert type(opt).__name__ == _RECIPE["optimiser"]
    assert opt.param_groups[0]["weight_decay"] == mail.CONFIGS["paper"].weight_decay
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 10% warm-up: steps 1..10 climb linearly to the base lr, then it falls linearly to zero
    assert lrs[:10] == pytest.approx([1e-4 * (i + 1) / 10 for i in range(10)])
    falls = np.diff(lrs[10:])
    assert np.allclose(falls, falls[0]) and falls[0] < 0 and lrs[-1] + falls[0] == pytest.approx(0)
    # the tiny config keeps our clipping and flips
    assert mail.CONFIGS["tiny"].clip_grad == 1.0 and mail.CONFIGS["tiny"].hflip is True


def test_wordpiece_unless_auto_without_a_vocab_is_an_error_not_bpe():
    """The paper's tokenizer is WordPiece: without a vocab.txt a sentence is an error naming the
    flag (`--random-init` no longer silently means CLIP BPE); only tokenizer="auto" (tiny) falls
    back to BPE."""
    from common.tokenizers import ClipTokenizer, MissingVocabulary

    strict = build("mail", tokenizer="wordpiece", image_size=64)
    assert isinstance(strict.tokenizer, MissingVocabulary)
    with pytest.raises(FileNotFoundError, match="--text-weights"):
        strict.tokenizer("the red circle")
    assert isinstance(build("mail", image_size=64).tokenizer, ClipTokenizer)
    assert all(mail.CONFIGS[k].tokenizer == "wordpiece" for k in mail.CONFIGS if k != "tiny")


def test_text_weights_give_the_wordpiece_vocabulary(tmp_path):
    """--text-weights names a BERT vocab.txt (or its folder): the tokenizer reads it, and the
    config records it, so that a checkpoint tokenises as training did."""
    from weights import write_vocab

    write_vocab(str(tmp_path), 120, ("the", "red", "circle"))
    model = build("mail", tokenizer="wordpiece", image_size=64,
                  text_weights=str(tmp_path / "vocab.txt"))
    assert isinstance(model.tokenizer, WordPieceTokenizer)
    assert model.cfg.vocab == str(tmp_path / "vocab.txt")
    ids, _ = model.tokenizer("the red circle")
    assert list(ids[:5]) == [2, 5, 6, 7, 3]  # [CLS] the red circle [SEP]


def test_images_are_normalised_with_vilts_statistics_and_padded_to_whole_patches():
    """Sec. 4.1: ViLT's preprocessing (its mean and std, the shorter side resized, padding to a
    multiple of the patch: tests/test_upstream.py checks the statistics against transformers'
    ViltImageProcessor); the 416 x 416 setting is square and needs no padding."""
    model = build("mail", image_size=64, max_size=96)
    spec, vilt = model.input_spec, model.encoder.vilt
    assert (spec.mean, spec.std) == (vilt.pixel_mean, vilt.pixel_std) == ((0.5,) * 3, (0.5,) * 3)
    assert (spec.resize, spec.pad_multiple) == ("shorter", vilt.patch_size)
    square = build("mail", image_size=64, max_size=None).input_spec
    assert (square.resize, square.pad_multiple) == ("square", 1)


def test_without_mask_modality_the_model_reads_no_candidates():
    """Tab. 2 variant 1: no mask modality, so no candidate inputs (and no proposals needed)."""
    model = build("mail", **mail.ABLATIONS["w/o mask modality"])
    assert model.input_names == ("image", "text", "text_mask")
    assert mail.MaIL.input_names_for(model.cfg) == model.input_names
    assert mail.MaIL.input_names_for(mail.CONFIGS["tiny"])[-2:] == ("cand_masks", "cand_valid")


def test_unimodal_weights_fill_vilt_from_vit_and_bert(tmp_path, capsys):
    """Tab. 2 variant 6 (`pretraining="uni-modal"`): blocks, patch projection, class token,
    positions and final norm from a ViT folder; word/position/segment embeddings from BERT's;
    the type embeddings from neither."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    spec = VILT_ARCHS["tiny"]
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(**spec), add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "vit")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(120)]
    bert = BertModel(BertConfig(vocab_size=len(words), hidden_size=spec["hidden_size"],
                                num_hidden_layers=1, num_attention_heads=4, intermediate_size=64),
                     add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    model = build("mail", pretraining="uni-modal", image_weights=str(tmp_path / "vit"),
                  text_weights=str(tmp_path / "bert"))
    enc, theirs = model.encoder.vilt, vit.state_dict()
    assert isinstance(model.tokenizer, WordPieceTokenizer)
    assert model.cfg.vocab == str(tmp_path / "bert" / "vocab.txt")
    for i, block in enumerate(enc.blocks):
        q = theirs.get(f"layers.{i}.attention.q_proj.weight",
                       theirs.get(f"encoder.layer.{i}.attention.attention.query.weight"))
        assert torch.equal(block.attention.attention.query.weight, q)
    assert torch.equal(enc.pos_embed, vit.embeddings.position_embeddings)
    assert torch.equal(enc.cls_token, vit.embeddings.cls_token)
    assert torch.equal(enc.patch_embed.weight, vit.embeddings.patch_embeddings.projection.weight)
    assert torch.equal(enc.norm.weight, vit.layernorm.weight)
    text = bert.embeddings
    assert torch.equal(enc.text_embed.word_embeddings.weight, text.word_embeddings.weight)
    assert torch.equal(enc.text_embed.position_embeddings.weight,
                       text.position_embeddings.weight[: enc.max_text_len])
    # the mask projection starts from the (ViT's) RGB projection, as with ViLT's weights
    assert torch.allclose(model.encoder.mask_embed.proj.weight,
                          enc.patch_embed.weight.sum(1, keepdim=True))
    batch = make_batch(model, n=2)
    assert torch.isfinite(model(**model.inputs_from(batch), target=batch["mask"])["loss"])
    printed = capsys.readouterr().out  # one line per folder, naming what it filled
    assert f"loaded {tmp_path / 'vit'}: " in printed and "into ViT image encoder" in printed
    assert f"loaded {tmp_path / 'bert'}: " in printed and "into BERT text encoder" in printed
    for i, change in enumerate([dict(num_hidden_layers=2), dict(hidden_size=64)]):
        ViTModel(ViTConfig(**(spec | change)), add_pooling_layer=False
                 ).save_pretrained(tmp_path / f"vit{i}")
        key, value = next(iter(change.items()))
        with pytest.raises(ValueError, match=f"ViT with .*'{key}': {value}"):
            build("mail", pretraining="uni-modal", image_weights=str(tmp_path / f"vit{i}"))
    small = BertModel(BertConfig(vocab_size=50, hidden_size=spec["hidden_size"],
                                 num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64), add_pooling_layer=False)
    small.save_pretrained(tmp_path / "bert50")
    vilt = build("mail", image_size=64).encoder.vilt
    n_words = vilt.text_embed.word_embeddings.weight.shape[0]
    with pytest.raises(ValueError, match=rf"holds word embeddings \(50, {spec['hidden_size']}\), "
                                         rf"this ViLT \({n_words}, {spec['hidden_size']}\)"):
        mail.load_unimodal_weights(vilt, str(tmp_path / "vit"), str(tmp_path / "bert50"))


def test_a_square_size_not_a_multiple_of_the_patch_is_resized_back_bilinearly():
    """The head returns h*P x w*P pixels; a square input whose side is not a multiple of P
    (416 is one of ViLT-B/32's 32 px; 72 is not one of the tiny ViLT's) gets its logits resized
    to H x W, bilinearly with align_corners=False; the image mask comes back with the output
    for the pictures."""
    import torch.nn.functional as F

    model = build("mail", image_size=72, max_size=None).eval()
    P = model.encoder.vilt.patch_size
    assert 72 % P
    batch = make_batch(model, n=2)
    seen = {}
    model.head.register_forward_hook(lambda m, i, o: seen.update(head=o))
    with torch.no_grad():
        out = model(**model.inputs_from(batch))
    assert seen["head"].shape[-2:] == (72 // P * P,) * 2
    want = F.interpolate(seen["head"], size=(72, 72), mode="bilinear", align_corners=False)
    assert torch.allclose(out["mask_logits"], want, atol=1e-6)
    assert torch.equal(out["image_mask"], model.inputs_from(batch)["image_mask"])
