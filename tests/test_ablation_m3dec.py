"""M3Dec's ablation switches (Sec. IV-B, Tables I-III): each row of `m3dec.ABLATIONS` builds on
`tiny` through train.py's --set, trains a step and predicts the same shape; each switch removes
exactly the parameters it names and no others; the defaults are the full model."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build, make_batch

import m3dec
import train
from common.runconfig import build_config

SWITCHES = ("shared_attention", "attention", "imi", "lfr", "mask_decoder", "dec_layers")


def names(model) -> set[str]:
    return {n for n, _ in model.named_parameters()}


@pytest.fixture(scope="module")
def full():
    return build("m3dec")


def test_defaults_are_the_full_model(full):
    for config in ("tiny", "paper-cnn", "paper-swin"):
        cfg = m3dec.CONFIGS[config]
        assert (cfg.shared_attention, cfg.attention, cfg.imi, cfg.lfr, cfg.mask_decoder,
                cfg.dec_layers) == (True, "m3att", "iterative", True, "kernels", 3), config
    # the parameter names of the model before the switches existed (sha256 of the state-dict
    # keys of tiny, in order): 351 entries, 1,340,347 parameters
    keys = list(full.state_dict())
    assert len(keys) == 351 and sum(p.numel() for p in full.parameters()) == 1_340_347
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16] == "1fa87b64a80356d1"
    assert m3dec.ABLATIONS["ours"] == {}


@pytest.mark.slow
@pytest.mark.parametrize("row", list(m3dec.ABLATIONS))
def test_every_row_builds_through_set_and_trains(row):
    """--set FIELD=VALUE on tiny gives the row's config; one training step reaches every
    parameter; eval predicts (B, 1, H, W) and ignores padding."""
    overrides = m3dec.ABLATIONS[row]
    assert set(overrides) <= set(SWITCHES)
    argv = ["--model", "m3dec", "--config", "tiny"]
    for field, value in overrides.items():
        assert isinstance(value, (bool, int, str)) and value != "none", (row, field)
        argv += ["--set", f"{field}={value}"]
    cfg = build_config(m3dec, train.parse_args(argv))
    assert all(getattr(cfg, f) == v for f, v in overrides.items())
    model = build("m3dec", **overrides)
    assert model.cfg == cfg
    batch = make_batch(model, n=2)
    model.train()
    out = model(**model.inputs_from(batch), target=batch["mask"])
    assert out["mask_logits"].shape == (2, 1, 128, 128) and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    model.eval()
    inputs = model.inputs_from(batch)
    padded = dict(inputs, text=F.pad(inputs["text"], (0, 3), value=model.tokenizer.pad_id),
                  text_mask=F.pad(inputs["text_mask"], (0, 3), value=False))
    with torch.no_grad():
        assert torch.allclose(model(**inputs)["mask_logits"], model(**padded)["mask_logits"],
                              atol=1e-4)


def test_without_lfr_there_is_no_reconstruction(full):
    model = build("m3dec", lfr=False)
    assert model.lfr is None
    assert names(model) == {n for n in names(full) if not n.startswith("lfr.")}
    batch = make_batch(model, n=2)
    out = model.train()(**model.inputs_from(batch), target=batch["mask"])
    assert not {"loss_rec", "lang_rec", "lang_proj"} & set(out)
    assert torch.equal(out["loss"], model.cfg.w_mask * out["loss_mask"])


def test_without_imi_no_block_between_layers(full):
    model = build("m3dec", imi="off")
    assert len(model.imi) == 0
    assert names(model) == {n for n in names(full) if not n.startswith("imi.")}


def test_imi_star_injects_f_t_into_every_layer(full):
    """IMI* (Table II #3): F'_dec^n = BN(F_dec^n + w_ci F_t), F_t passed on unchanged; no F_l^n
    pathway (W_a, W'_l, the linear layer to F_l^n) exists."""
    model = build("m3dec", imi="same")
    pathway = ("to_lang", "lang_norm", "w_a", "w_l")
    dropped = {n for n in names(full) if n.startswith("imi.") and n.split(".")[2] in pathway}
    assert dropped and names(model) == names(full) - dropped
    block = m3dec.IMIBlock(8, transform=False).eval()  # BN: mean 0, var 1, weight 1, bias 0
    with torch.no_grad():
        block.w_ci.fill_(0.7)
    f_dec, f_t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        out, f_l = block(f_dec, f_t, mask)
    assert f_l is f_t  # the next block receives F_t again
    ref = (f_dec + 0.7 * f_t) / math.sqrt(1 + block.norm.eps) * mask[..., None]
    assert torch.allclose(out, ref, atol=1e-6)


def test_generic_attention_is_a_standard_decoder_layer(full):
    """Generic (LAV only): no M3Att parameters; the layer is self-attention, cross-attention with
    F_enc as key and value, FFN, each residual + LayerNorm."""
    model = build("m3dec", attention="generic")
    assert names(model) == {n for n in names(full) if ".mutual." not in n}
    torch.manual_seed(0)
    layer = m3dec.M3DecLayer(8, 2, 16, 6, True, 0.0, mutual=False).eval()
    q, f_enc = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    out, attn = layer(q, f_enc, mask)
    f_q = layer.norm1(q + layer.self_attn(q, q, q, key_mask=mask))
    x = layer.norm2(f_q + layer.cross_attn(f_q, f_enc, f_enc))
    assert attn is None and torch.allclose(out, layer.norm3(x + layer.ffn(x)), atol=1e-6)
    batch = make_batch(model, n=2)
    with torch.no_grad():
        out = model.eval()(**model.inputs_from(batch))
    assert "mutual_attn" not in out and model.vis_panels(out, 0) == []


def test_independent_attention_adds_only_two_key_layers(full):
    model = build("m3dec", shared_attention=False)
    extra = names(model) - names(full)
    assert not names(full) - names(model)
    assert {n.split(".")[3] for n in extra} == {"to_lk2", "to_vk2"}
    assert len(extra) == 2 * 2 * full.cfg.dec_layers  # weight and bias, per layer


@pytest.mark.parametrize("n", [1, 2, 4])
def test_decoder_layers_and_imi_blocks(n):
    model = build("m3dec", dec_layers=n)
    assert len(model.decoder) == n and len(model.imi) == n - 1


def test_concate_mask_decoder_joins_summed_words_to_f_enc(full):
    """Table III "Concate": F_dec summed over the real words, tiled over F_enc's grid and
    concatenated to it; only the first conv's input width changes."""
    model = build("m3dec", mask_decoder="concat")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    full_shapes = {n: p.shape for n, p in full.named_parameters()}
    assert shapes.keys() == full_shapes.keys()
    assert {n for n in shapes if shapes[n] != full_shapes[n]} == {"mask_decoder.convs.0.0.weight"}
    C, max_len = 8, 4
    torch.manual_seed(0)
    dec = m3dec.MaskDecoder(C, 2, max_len, 6, 0.0, concat=True).eval()
    seen = []
    dec.convs.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    f_dec, f_enc = torch.randn(2, 3, C), torch.randn(2, C, 4, 4)
    mask = torch.tensor([[True] * 3, [True, True, False]])
    assert dec(f_dec, f_enc, mask).shape == (2, 1, 32, 32)
    kernels = dec.norm(f_dec + dec.self_attn(f_dec, f_dec, f_dec, key_mask=mask))
    summed = (kernels * mask[..., None]).sum(1)  # (B, C)
    maps = seen[0]
    assert maps.shape == (2, 2 * C, 4, 4) and torch.equal(maps[:, :C], f_enc)
    assert torch.allclose(maps[:, C:], summed[:, :, None, None].expand(2, C, 4, 4), atol=1e-6)


def test_unknown_switch_values_are_refused():
    for field, value in (("attention", "M3Att"), ("imi", "imi*"), ("mask_decoder", "vlt")):
        with pytest.raises(ValueError, match=field):
            build("m3dec", **{field: value})
