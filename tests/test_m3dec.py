"""M3Dec-specific checks: M3Att against Eq. (1)-(2b), IMI and LFR gradients, padding, the GRU
vocabulary through a checkpoint, the encoders of both settings, the per-word visualisation."""

import dataclasses
import math
import os
import struct

import pytest
import torch
import torch.nn.functional as F
from helpers import build, make_batch

import m3dec
from common.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from common.encoders import Darknet53, GRUTextEncoder, load_glove
from common.encoders.bert import BERT_VOCAB_SIZE
from common.tokenizers import split_words


def eq_1_2b(att: m3dec.MutualAttention, lang, vis, independent: bool):
    """A direct transcription of Eq. (1), (2a), (2b) and F_mul for one sample of real words:
    lang (L, C), vis (N, C). Returns the output linear layer's result (L, C) and softmax(A)."""
    C = lang.shape[1]
    lin = lambda layer, x: x @ layer.weight.T + layer.bias
    A = lin(att.to_lk, lang) @ lin(att.to_vk, vis).T / math.sqrt(C)  # Eq. (1), (L, N)
    A_2b = lin(att.to_lk2, lang) @ lin(att.to_vk2, vis).T / math.sqrt(C) if independent else A
    F_Va = torch.softmax(A, dim=1) @ lin(att.to_vv, vis)  # Eq. (2a): along each HW axis
    F_La = torch.softmax(A_2b.T, dim=1) @ lin(att.to_lv, lang)  # Eq. (2b): along each N_t axis
    F_mul = F_Va @ F_La.T  # (L, HW)
    return lin(att.to_out, F_mul), torch.softmax(A, dim=1)


@pytest.mark.parametrize("shared", [True, False])
def test_mutual_attention_matches_equations(shared):
    torch.manual_seed(0)
    C, N, L = 8, 6, 5
    att = m3dec.MutualAttention(C, N, shared=shared).eval()  # BN: running mean 0, var 1
    lang, vis = torch.randn(2, L, C), torch.randn(2, N, C)
    text_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out, attn = att(lang, vis, text_mask)
    bn_scale = 1 / math.sqrt(1 + att.norm.eps)
    for b in range(2):
        n = int(text_mask[b].sum())
        ref, ref_attn = eq_1_2b(att, lang[b, :n], vis[b], not shared)
        assert torch.allclose(out[b, :n], F.relu(ref * bn_scale), atol=1e-5)
        assert torch.allclose(attn[b, :n], ref_attn, atol=1e-6)
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))  # padding stays zero


def test_imi_scalars_and_lfr_get_gradients():
    model = build("m3dec")
    batch = make_batch(model, n=3)
    model.train()
    out = model(**model.inputs_from(batch), target=batch["mask"])
    assert out["lang_rec"].shape == out["lang_proj"].shape == (3, model.cfg.dim)
    out["loss"].backward()
    assert len(model.imi) == model.cfg.dec_layers - 1
    for block in model.imi:
        assert block.w_ci.grad is not None and block.w_ci.grad.abs() > 0
    for name, p in model.lfr.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the reconstruction loss alone reaches the decoder (LFR supervises F_dec) and the words
    model.zero_grad(set_to_none=True)
    model(**model.inputs_from(batch), target=batch["mask"])["loss_rec"].backward()
    assert model.decoder[-1].norm3.weight.grad.abs().sum() > 0
    assert model.text_encoder.fwd.weight_ih_l0.grad.abs().sum() > 0


def test_padding_changes_nothing_in_train_mode_statistics():
    """Padded words enter no BN statistics: the same real words give the same training-mode
    output and the same running statistics whatever the padding."""
    model = build("m3dec")
    batch = make_batch(model, n=3)
    padded = dict(batch)
    padded["text"] = F.pad(batch["text"], (0, 4), value=model.tokenizer.pad_id)
    padded["text_mask"] = F.pad(batch["text_mask"], (0, 4), value=False)
    results = []
    for b in (batch, padded):
        torch.manual_seed(0)
        again = build("m3dec").train()
        out = again(**again.inputs_from(b), target=b["mask"])
        results.append((out["mask_logits"], out["loss"], again.imi[0].norm.running_mean.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5)


def test_gru_encoder_ignores_padding_in_both_directions():
    torch.manual_seed(0)
    enc = GRUTextEncoder(("<pad>", "<unk>", "a", "b", "c"), dim=6, word_dim=4)
    ids = torch.tensor([[2, 3, 4]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    words, sent, _ = enc(ids, mask)
    words_p, sent_p, _ = enc(F.pad(ids, (0, 3)), F.pad(mask, (0, 3), value=False))
    assert torch.allclose(words, words_p[:, :3], atol=1e-6)
    assert torch.equal(words_p[:, 3:], torch.zeros_like(words_p[:, 3:]))
    assert torch.allclose(sent, sent_p, atol=1e-6)
    # the backward direction really reads right to left: reversing the words changes F_t'
    assert not torch.allclose(sent, enc(ids.flip(1), mask)[1], atol=1e-4)


def test_vocabulary_round_trips_through_a_checkpoint(tmp_path):
    sentences = ["the red ball", "a red cube", "the cube", "ball ball", "the zebra"]
    cfg = m3dec.prepare_config(m3dec.CONFIGS["tiny"], sentences)
    assert cfg.vocab == ("<pad>", "<unk>", "ball", "cube", "red", "the")
    torch.manual_seed(0)
    model = m3dec.M3Dec(cfg).eval()
    assert model.text_encoder.embed.num_embeddings == len(cfg.vocab)
    path = str(tmp_path / "m3dec.pt")
    torch.save(dict(model_name="m3dec", config=dataclasses.asdict(cfg), model=model.state_dict()),
               path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    again, _, cfg2 = build_model_from_checkpoint(ckpt)
    assert cfg2.vocab == cfg.vocab and isinstance(cfg2.vocab, tuple)
    for s in ("the zebra left of a red cube", "ball"):
        assert again.tokenizer(s) == model.tokenizer(s)
    assert again.tokenizer("zebra")[0] == [1]  # unknown -> <unk>
    batch = make_batch(model, n=2)
    again.eval()
    with torch.no_grad():
        assert torch.equal(model(**model.inputs_from(batch))["mask_logits"],
                           again(**again.inputs_from(batch))["mask_logits"])


def test_missing_vocabulary_is_an_error():
    model = build("m3dec", vocab=())  # builds (shape checks, checkpoints) ...
    with pytest.raises(FileNotFoundError, match="prepare_config"):
        model.tokenizer("the red circle")  # ... but cannot read a sentence
    assert model.text_encoder.embed.num_embeddings == 2  # the stand-in's <pad> and <unk> rows
    bert = build("m3dec", image_encoder="swin-tiny", text_encoder="bert-tiny", max_len=12)
    with pytest.raises(FileNotFoundError, match="bert_vocab"):
        bert.tokenizer("the red circle")
    assert bert.text_encoder.bert.embeddings.word_embeddings.num_embeddings == BERT_VOCAB_SIZE
    assert m3dec.prepare_config(m3dec.CONFIGS["paper-swin"], ["x"]) == m3dec.CONFIGS["paper-swin"]


def test_unknown_encoders_are_refused():
    for field, value in (("image_encoder", "resnet101"), ("text_encoder", "lstm")):
        with pytest.raises(ValueError, match=f"{field} must be one of"):
            build("m3dec", **{field: value})


def test_transformer_setting_runs_with_small_swin_and_bert():
    model = build("m3dec", image_encoder="swin-tiny", text_encoder="bert-tiny", image_size=128,
                  max_len=12)
    B, L = 2, 6
    ids = torch.randint(1000, 2000, (B, L))
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    image, target = torch.randn(B, 3, 128, 128), (torch.rand(B, 1, 128, 128) > 0.5).float()
    model.train()
    out = model(image, ids, mask, target=target)
    assert out["mask_logits"].shape == (B, 1, 128, 128)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        a = model(image, ids, mask)["mask_logits"]
        b = model(image, F.pad(ids, (0, 3)), F.pad(mask, (0, 3), value=False))["mask_logits"]
    assert torch.allclose(a, b, atol=1e-4)


def test_darknet53_strides_and_binary_weights(tmp_path):
    with torch.device("meta"):
        feats = Darknet53("darknet53")(torch.zeros(1, 3, 416, 416))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 208, 208), (128, 104, 104),
                                                   (256, 52, 52), (512, 26, 26), (1024, 13, 13)]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in Darknet53("darknet53").modules()) == 52
    # a Darknet binary file: header, then per conv BN bias, weight, mean, var and the kernel
    torch.manual_seed(0)
    src = Darknet53("tiny")
    values = []
    for m in src.modules():
        if isinstance(m, torch.nn.Sequential) and isinstance(m[0], torch.nn.Conv2d):
            bn = m[1]
            for t in (bn.bias, bn.weight.data.uniform_(), bn.running_mean.normal_(),
                      bn.running_var.uniform_(0.5, 2), m[0].weight):
                values.append(t.detach().flatten())
    path = str(tmp_path / "tiny.weights")
    with open(path, "wb") as f:
        f.write(struct.pack("<3iq", 0, 2, 0, 0))
        f.write(torch.cat(values + [torch.randn(7)]).numpy().tobytes())  # + a "detection head"
    dst = Darknet53("tiny", weights=path)
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        if "num_batches_tracked" not in name:
            assert torch.equal(a, b), name


def test_glove_file_initialises_known_words(tmp_path):
    path = str(tmp_path / "glove.txt")
    with open(path, "w") as f:
        f.write("red 1 2 3\nat&t web . 4 5 6\nball 7 8 9\n")  # words may contain spaces
    weight = torch.zeros(4, 3)
    assert load_glove(weight, ("<pad>", "<unk>", "red", "ball"), path) == 2
    assert weight[2].tolist() == [1, 2, 3] and weight[3].tolist() == [7, 8, 9]
    assert weight[:2].abs().sum() == 0
    with pytest.raises(ValueError, match="5-d"):
        load_glove(torch.zeros(4, 5), ("<pad>", "<unk>", "red"), path)


def test_vis_panels_one_per_word_titled_with_the_word():
    model = build("m3dec").eval()
    batch = make_batch(model, n=2)
    with torch.no_grad():
        out = model(**model.inputs_from(batch))
    for i in range(2):
        panels = model.vis_panels(out, i)
        words = split_words(batch["sentence"][i])
        assert [title for title, _ in panels] == [f"{k}: {w}" for k, w in enumerate(words)]
        for _, value in panels:
            assert value.shape == (model.grid, model.grid)
            assert value.min() >= 0 and math.isclose(float(value.max()), 1.0, rel_tol=1e-5)


def test_eval_save_vis_draws_the_word_panels(tmp_path):
    import eval as evaluate

    model = build("m3dec")
    ckpt = dict(model_name="m3dec", config=dataclasses.asdict(model.cfg), model=model.state_dict())
    path = str(tmp_path / "c.pt")
    save_checkpoint(ckpt, path)
    evaluate.main(["--checkpoint", path, "--save-vis", str(tmp_path / "vis"), "--num-vis", "2",
                   "--shapes-eval-size", "4", "--shapes-image-size", "64", "--batch-size", "2"])
    assert len(os.listdir(tmp_path / "vis")) == 2


def test_bert_vocabulary_follows_the_checkpoint(tmp_path):
    """The transformer setting: prepare_config keeps BERT's vocab.txt in the config, so a model
    rebuilt from a checkpoint (no weight paths) tokenises as training did."""
    from transformers import BertConfig, BertModel

    from common.encoders import BERT_ARCHS

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=200, **BERT_ARCHS["tiny"]),
              add_pooling_layer=False).save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "circle"]
    (folder / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(192)]) + "\n")
    cfg = dataclasses.replace(m3dec.CONFIGS["tiny"], image_encoder="swin-tiny",
                              text_encoder="bert-tiny", image_size=128, max_len=12,
                              text_weights=str(folder))
    cfg = m3dec.prepare_config(cfg, ["the red circle"])
    assert cfg.bert_vocab == str(folder)
    model = build("m3dec", **{k: getattr(cfg, k) for k in ("image_encoder", "text_encoder",
                                                            "image_size", "max_len",
                                                            "text_weights", "bert_vocab")})
    assert model.tokenizer("The red circle")[0] == [2, 5, 6, 7, 3]
    path = str(tmp_path / "c.pt")
    save_checkpoint(dict(model_name="m3dec", config=dataclasses.asdict(model.cfg),
                               model=model.state_dict()), path)
    again, _, cfg2 = build_model_from_checkpoint(load_checkpoint(path))
    assert cfg2.text_weights is None
    assert again.tokenizer("the red circle") == model.tokenizer("the red circle")
    ids = torch.tensor([model.tokenizer("the red circle")[0]])
    with torch.no_grad():
        out = again.eval()(torch.randn(1, 3, 128, 128), ids, torch.ones_like(ids, dtype=torch.bool))
    titles = [t for t, _ in again.vis_panels(out, 0)]
    assert titles == ["0: [CLS]", "1: the", "2: red", "3: circle", "4: [SEP]"]


# The paper configs' recipes (Sec. IV-A, "Implementation Details", which states one recipe for
# both backbones), each value with its source.
PAPER_RECIPE = dict(
    max_len=15,  # Sec. IV-A: "padded to 15 words for RefCOCO/RefCOCO+" (20 for RefCOCOg)
    optimiser="Adam",  # Sec. IV-A: "using the Adam [60] optimizer"
    lr=0.005,  # Sec. IV-A: "The learning rate is set to 0.005"
    weight_decay=0.0,  # not in the paper, so none
    warmup=0,  # not in the paper, so none
    schedule=("step", (0.8, 0.9), 0.1),  # Sec. IV-A "a step decay schedule"; milestones and
    # factor not in the paper (VLT's code: epochs 40, 45 of 50, x0.1)
    encoder_lr_scale=0.1,  # not in the paper
    batch_size=48,  # Sec. IV-A: "the batch size set to 48"
    epochs=50,  # Sec. IV-A: "trained for 50 epochs"
    clip_grad=0.0,  # not in the paper, so none
    hflip=False,  # not in the paper, so no augmentation
    w_mask=1.0,  # Sec. IV-A: "w_mask is set to 1"
    w_rec=0.1,  # Sec. IV-A: "w_rec is set to 0.1"
    dim=256,  # Sec. IV-A: "C is fixed to 256 for the transformers"
    mask_dim=512,  # Sec. IV-A: "and 512 for the mask decoder"
    enc_layers=2,  # Sec. IV-A: "The network has 2 encoder layers"
    heads=8,  # Sec. IV-A: "The head number is 8"
    dec_layers=3,  # Sec. IV-B: "Shared M3Att with 3 decoders as the default setup"
)
PAPER_RECIPES = {
    # Sec. IV-A: "416x416 for CNN backbone"; Darknet-53 + GloVe, fixed vectors ("generated by")
    "paper-cnn": dict(PAPER_RECIPE, image_size=416, image_encoder="darknet53", text_encoder="gru",
                      freeze_word_vectors=True),
    # Sec. IV-A: "480x480 for Transformer backbone"; Table IV: Swin-B + BERT; BERT's 20 tokens
    # with [CLS] and [SEP] are ours (about 15 words, see the Interpretations); the ImageNet-22K
    # window-12 Swin-B is not in the paper (LAVT's README's file)
    "paper-swin": dict(PAPER_RECIPE, image_size=480, image_encoder="swin_b-w12",
                       text_encoder="bert-base", max_len=20),
}


def test_paper_configs_are_the_recipe_table():
    assert {c for c in m3dec.CONFIGS if c.startswith("paper")} == set(PAPER_RECIPES) | {"paper"}
    assert m3dec.CONFIGS["paper"] is m3dec.CONFIGS["paper-cnn"]
    tiny = m3dec.CONFIGS["tiny"]
    assert tiny.clip_grad == 1.0 and tiny.hflip and not tiny.freeze_word_vectors  # from scratch
    for name, recipe in PAPER_RECIPES.items():
        cfg = m3dec.CONFIGS[name]
        fields = {k: v for k, v in recipe.items()
                  if k not in ("optimiser", "weight_decay", "warmup", "schedule")}
        assert {k: getattr(cfg, k) for k in fields} == fields, name
        # optimiser and schedule: configure_optimizers on a tiny-sized model with this recipe
        small = dataclasses.replace(m3dec.CONFIGS["tiny"], lr=cfg.lr,
                                    encoder_lr_scale=cfg.encoder_lr_scale,
                                    lr_milestones=cfg.lr_milestones)
        model = build("m3dec", **{f.name: getattr(small, f.name)
                                  for f in dataclasses.fields(small)})
        total = 200
        opt, sched = model.configure_optimizers(cfg.lr, total)
        assert type(opt).__name__ == recipe["optimiser"]
        assert [(g["weight_decay"], g["initial_lr"]) for g in opt.param_groups] == [
            (0.0, recipe["lr"] * recipe["encoder_lr_scale"]), (0.0, recipe["lr"])]
        kind, marks, gamma = recipe["schedule"]
        factor = sched.lr_lambdas[0]
        assert factor(0) == 1.0  # no warm-up
        for step, want in ((159, 1.0), (160, gamma), (179, gamma), (180, gamma**2),
                           (199, gamma**2)):
            assert factor(step) == pytest.approx(want), step
        assert [int(m * total) for m in marks] == [160, 180]


def test_glove_vectors_are_fixed_in_the_paper_setting_and_trained_in_tiny():
    fixed = build("m3dec", freeze_word_vectors=True)
    assert not fixed.text_encoder.embed.weight.requires_grad
    assert fixed.text_encoder.fwd.weight_ih_l0.requires_grad  # the GRU itself trains
    assert all(p is not fixed.text_encoder.embed.weight for p in fixed.trainable_parameters())
    assert build("m3dec").text_encoder.embed.weight.requires_grad  # tiny
