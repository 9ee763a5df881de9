"""M3Dec's equations and architectural statements (Sec. III, Fig. 2-6), each re-stated here in
plain loops or matrix products on small random inputs and compared with the module, or checked by
a property the statement implies. M3Att (Eq. 1-2b) has its own transcription in test_m3dec.py.

Batch statistics are taken out of the comparison: the modules run in eval mode with random
running statistics, so that BN (Sec. IV-A "BN and ReLU", IMI's BN) is a fixed affine map that a
re-statement writes out as (x - mean) / sqrt(var + eps) * weight + bias."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build, make_batch

import m3dec
from common.layers import TokenBatchNorm

C, L, HEADS = 8, 5, 2
TEXT_MASK = torch.tensor([[True] * 5, [True, True, True, False, False]])  # (2, L)


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random running statistics and affine parameters in every BN, so no BN is an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (TokenBatchNorm, torch.nn.BatchNorm2d)):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    return module.eval()


def bn(norm, x):
    """BN in eval mode, written out: (x - running mean) / sqrt(running var + eps) * w + b."""
    return (x - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight \
        + norm.bias


def lin(layer, x):
    return x @ layer.weight.T + layer.bias


def cosine_position(length: int, dim: int) -> torch.Tensor:
    """The fixed sine/cosine encoding e, one entry at a time: position p, channel i < dim/2 takes
    sin(p / 10000^(i / (dim/2))), channel dim/2 + i the cosine of the same angle."""
    half = dim // 2
    e = torch.zeros(length, dim)
    for p in range(length):
        for i in range(half):
            angle = p / 10000 ** (i / half)
            e[p, i], e[p, half + i] = math.sin(angle), math.cos(angle)
    return e


# F_vis (Sec. III, Fig. 2) -------------------------------------------------------------------


def test_fvis_neck_joins_upsampled_stride32_to_stride16_then_1x1_bn_relu():
    torch.manual_seed(0)
    neck = randomise(m3dec.VisualNeck(c16=3, c32=5, dim=C))
    f16, f32 = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    out = neck(f16, f32)
    conv, norm = neck.proj[0], neck.proj[1]
    w = conv.weight[:, :, 0, 0]  # (C, 8)
    for b in range(2):
        for y in range(4):
            for x in range(4):
                joined = torch.cat([f16[b, :, y, x], f32[b, :, y // 2, x // 2]])  # nearest
                z = (w @ joined - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
                ref = F.relu(z * norm.weight + norm.bias)
                assert torch.allclose(out[b, :, y, x], ref, atol=1e-5)


# M3Dec layer (Sec. III-A, Fig. 3c) ----------------------------------------------------------


@pytest.mark.parametrize("mutual", [True, False])
def test_fig3c_decoder_layer_self_attention_m3att_cross_attention_ffn_with_residuals(mutual):
    """F_q = LN(q + SelfAttn(q)); M3Att(F_q, F_enc) is the cross-attention's key and value (the
    "Generic" layer: F_enc itself), F_q its query; then LN(x + FFN(x))."""
    torch.manual_seed(0)
    N = 6
    layer = randomise(m3dec.M3DecLayer(C, HEADS, 16, N, shared=True, dropout=0.0, mutual=mutual))
    query, f_enc = torch.randn(2, L, C), torch.randn(2, N, C)
    out, attn = layer(query, f_enc, TEXT_MASK)
    f_q = layer.norm1(query + layer.self_attn(query, query, query, key_mask=TEXT_MASK))
    if mutual:
        f_mm, ref_attn = layer.mutual(f_q, f_enc, TEXT_MASK)
        x = layer.norm2(f_q + layer.cross_attn(f_q, f_mm, f_mm, key_mask=TEXT_MASK))
        assert torch.allclose(attn, ref_attn)
    else:
        x = layer.norm2(f_q + layer.cross_attn(f_q, f_enc, f_enc))
        assert attn is None
    ref = layer.norm3(x + layer.ffn(x))
    for b in range(2):
        n = int(TEXT_MASK[b].sum())
        assert torch.allclose(out[b, :n], ref[b, :n], atol=1e-5)


def test_fig3c_m3att_output_is_the_cross_attention_value_not_fenc():
    """The multi-modal feature (M3Att's output) is what the cross-attention reads: changing
    F_enc changes the output only through M3Att, so a layer with M3Att's output zeroed ignores
    F_enc entirely."""
    torch.manual_seed(0)
    N = 6
    layer = randomise(m3dec.M3DecLayer(C, HEADS, 16, N, shared=True, dropout=0.0))
    with torch.no_grad():
        layer.mutual.norm.weight.zero_()
        layer.mutual.norm.bias.zero_()  # M3Att's output is now 0 whatever F_enc
    query = torch.randn(2, L, C)
    a, _ = layer(query, torch.randn(2, N, C), TEXT_MASK)
    b, _ = layer(query, torch.randn(2, N, C), TEXT_MASK)
    assert torch.allclose(a, b, atol=1e-6)


# IMI (Sec. III-B, Eq. 3, Fig. 4) -------------------------------------------------------------


def imi_by_hand(block, f_dec, f_l_prev, text_mask):
    """Eq. (3) for one sample of real words, rows and columns written out."""
    n = int(text_mask.sum())
    f_dec, f_l_prev = f_dec[:n], f_l_prev[:n]
    f_l = F.relu(bn(block.lang_norm, lin(block.to_lang, f_l_prev)))  # F_l^n (linear, BN, ReLU)
    q = F.relu(lin(block.w_a, f_dec))  # ReLU[F_dec^n W_a^n]
    f_l_prime = F.relu(lin(block.w_l, f_l))  # F'_l^n = ReLU[F_l^n W'_l^n]
    f_i = torch.zeros(n, f_dec.shape[1])
    for i in range(n):  # one row of A_l^n: softmax over the words j of F_l^n
        logits = torch.stack([q[i] @ f_l[j] for j in range(n)])
        weights = torch.exp(logits - logits.max())
        weights = weights / weights.sum()
        f_i[i] = sum(weights[j] * f_l_prime[j] for j in range(n))  # F_i^n = A_l^n F'_l^n
    return bn(block.norm, f_dec + block.w_ci * f_i), f_l  # BN(F_dec^n + w_ci^n F_i^n), F_l^n


def test_eq3_imi_matches_a_loop_over_words():
    torch.manual_seed(0)
    block = randomise(m3dec.IMIBlock(C))
    with torch.no_grad():
        block.w_ci.fill_(0.7)
    f_dec, f_l = torch.randn(2, L, C) * 2, torch.randn(2, L, C)
    out, lang = block(f_dec, f_l, TEXT_MASK)
    for b in range(2):
        n = int(TEXT_MASK[b].sum())
        ref, ref_lang = imi_by_hand(block, f_dec[b], f_l[b], TEXT_MASK[b])
        assert torch.allclose(out[b, :n], ref, atol=1e-5)
        assert torch.allclose(lang[b, :n], ref_lang, atol=1e-5)
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))  # padding stays zero


def test_eq3_imi_attention_rows_sum_to_one_over_real_words():
    """softmax along F_l^n's words: with F'_l^n the same vector w for every word, F_i^n = w in
    every row (rows of A_l^n sum to one; a column softmax would not give that)."""
    torch.manual_seed(0)
    block = randomise(m3dec.IMIBlock(C))
    with torch.no_grad():
        block.w_l.weight.zero_()
        block.w_l.bias.copy_(torch.rand(C) + 0.1)  # F'_l^n = ReLU(bias) = bias for every word
        block.norm.running_mean.zero_(), block.norm.running_var.fill_(1 - block.norm.eps)
        block.norm.weight.fill_(1.0), block.norm.bias.zero_()  # BN = identity
        block.w_ci.fill_(1.0)
    f_dec = torch.randn(2, L, C)
    out, _ = block(f_dec, torch.randn(2, L, C), TEXT_MASK)
    for b in range(2):
        n = int(TEXT_MASK[b].sum())
        assert torch.allclose(out[b, :n] - f_dec[b, :n], block.w_l.bias.expand(n, C), atol=1e-5)


def test_eq3_imi_padded_words_take_no_attention():
    torch.manual_seed(0)
    block = randomise(m3dec.IMIBlock(C))
    f_dec, f_l = torch.randn(1, L, C), torch.randn(1, L, C)
    mask = torch.tensor([[True, True, True, False, False]])
    a, _ = block(f_dec, f_l, mask)
    f_l2 = f_l.clone()
    f_l2[:, 3:] = torch.randn(1, 2, C) * 10  # padded words' features changed
    b, _ = block(f_dec, f_l2, mask)
    assert torch.allclose(a, b, atol=1e-6)


def test_table2_imi_star_injects_the_same_ft_and_passes_it_on():
    """IMI* (Table II #3): F'_dec^n = BN(F_dec^n + w_ci F_t), the language path unchanged."""
    torch.manual_seed(0)
    block = randomise(m3dec.IMIBlock(C, transform=False))
    with torch.no_grad():
        block.w_ci.fill_(0.4)
    f_dec, f_t = torch.randn(2, L, C), torch.randn(2, L, C)
    out, lang = block(f_dec, f_t, TEXT_MASK)
    assert torch.equal(lang, f_t)
    for b in range(2):
        n = int(TEXT_MASK[b].sum())
        assert torch.allclose(out[b, :n], bn(block.norm, f_dec[b, :n] + 0.4 * f_t[b, :n]),
                              atol=1e-5)


# LFR (Sec. III-C, Eq. 4, Fig. 5) -------------------------------------------------------------


def lfr_by_hand(lfr, f_dec, words, sentence, text_mask):
    """Eq. (4) and Fig. 5 for one sample: F_proj = 1/(N_t+1) sum ReLU([(F_t + e) (c) F_t'] W_proj);
    F_rec = AvgPool over the words of three stacked linear layers (BN, ReLU on the first two)."""
    n = int(text_mask.sum())
    e = cosine_position(words.shape[0], words.shape[1])
    seq = [words[p] + e[p] for p in range(n)] + [sentence]  # N_t + 1 rows
    f_proj = sum(F.relu(lin(lfr.w_proj, row)) for row in seq) / (n + 1)
    x = F.relu(bn(lfr.norm1, lin(lfr.fc1, f_dec[:n])))
    x = F.relu(bn(lfr.norm2, lin(lfr.fc2, x)))
    f_rec = lin(lfr.fc3, x).sum(0) / n
    return f_rec, f_proj


def lfr_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, L, C, generator=gen), torch.randn(2, L, C, generator=gen),
            torch.randn(2, C, generator=gen))


def test_eq4_lfr_matches_a_loop_with_cosine_positions():
    torch.manual_seed(0)
    lfr = randomise(m3dec.LanguageReconstruction(C))
    f_dec, words, sentence = lfr_inputs()
    f_rec, f_proj = lfr(f_dec, words, sentence, TEXT_MASK)
    for b in range(2):
        ref_rec, ref_proj = lfr_by_hand(lfr, f_dec[b], words[b], sentence[b], TEXT_MASK[b])
        assert torch.allclose(f_rec[b], ref_rec, atol=1e-5)
        assert torch.allclose(f_proj[b], ref_proj, atol=1e-5)


def test_eq4_target_carries_word_order():
    """e "adds information about the order of words": swapping two words changes F_proj (the sum
    over the sequence would otherwise be order-free)."""
    torch.manual_seed(0)
    lfr = m3dec.LanguageReconstruction(C).eval()
    f_dec, words, sentence = lfr_inputs()
    mask = torch.ones(2, L, dtype=torch.bool)
    _, a = lfr(f_dec, words, sentence, mask)
    _, b = lfr(f_dec, words[:, [1, 0, 2, 3, 4]], sentence, mask)
    assert (a - b).abs().max() > 1e-3


def test_eq4_target_ignores_padded_words_and_counts_the_sentence_once():
    torch.manual_seed(0)
    lfr = m3dec.LanguageReconstruction(C).eval()
    f_dec, words, sentence = lfr_inputs()
    mask = torch.tensor([[True, True, False, False, False]] * 2)
    rec, proj = lfr(f_dec, words, sentence, mask)
    words2, f_dec2 = words.clone(), f_dec.clone()
    words2[:, 2:], f_dec2[:, 2:] = 5.0, -5.0
    rec2, proj2 = lfr(f_dec2, words2, sentence, mask)
    assert torch.allclose(proj, proj2) and torch.allclose(rec, rec2)
    # the sentence is one of N_t + 1 = 3 rows: its own ReLU(F_t' W_proj) weighs 1/3
    with torch.no_grad():
        only_sentence = F.relu(lfr.w_proj(sentence))
        _, proj_zero_sentence = lfr(f_dec, words, torch.full_like(sentence, 0.0), mask)
        zero_row = F.relu(lfr.w_proj.bias).expand_as(only_sentence)
    assert torch.allclose(proj - proj_zero_sentence, (only_sentence - zero_row) / 3, atol=1e-6)


def test_lfr_target_paper_gets_gradient_from_lrec():
    """As written (lfr_target="paper"): L_rec reaches W_proj, F_t and F_t' through F_proj."""
    lfr = m3dec.LanguageReconstruction(C, "paper").train()
    f_dec, words, sentence = (t.requires_grad_() for t in lfr_inputs())
    f_rec, f_proj = lfr(f_dec, words, sentence, TEXT_MASK)
    assert f_proj.requires_grad
    F.mse_loss(f_rec, f_proj).backward()
    for t in (words, sentence, lfr.w_proj.weight, f_dec):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_lfr_target_detached_stops_the_gradient():
    lfr = m3dec.LanguageReconstruction(C, "detached").train()
    assert not any(p.requires_grad for p in lfr.w_proj.parameters())  # nothing would train it
    assert all(p.requires_grad for n, p in lfr.named_parameters() if not n.startswith("w_proj"))
    f_dec, words, sentence = (t.requires_grad_() for t in lfr_inputs())
    f_rec, f_proj = lfr(f_dec, words, sentence, TEXT_MASK)
    assert not f_proj.requires_grad
    F.mse_loss(f_rec, f_proj).backward()
    assert words.grad is None and sentence.grad is None
    assert f_dec.grad.abs().sum() > 0  # F_rec still learns to match
    # the same values as the paper's target
    ref = m3dec.LanguageReconstruction(C, "paper")
    ref.load_state_dict(lfr.state_dict())
    assert torch.allclose(ref.train()(f_dec, words, sentence, TEXT_MASK)[1], f_proj)


def test_lfr_target_normalised_has_unit_rms_and_ignores_the_scale_of_wproj():
    torch.manual_seed(0)
    lfr = m3dec.LanguageReconstruction(C, "normalised").eval()
    f_dec, words, sentence = lfr_inputs()
    _, f_proj = lfr(f_dec, words, sentence, TEXT_MASK)
    assert torch.allclose(f_proj.pow(2).mean(-1), torch.ones(2), atol=1e-4)
    # ReLU and the mean are positively homogeneous: W_proj x c scales the raw target by c ...
    raw = m3dec.LanguageReconstruction(C, "paper").eval()
    raw.load_state_dict(lfr.state_dict())
    _, raw_proj = raw(f_dec, words, sentence, TEXT_MASK)
    assert torch.allclose(f_proj, raw_proj / raw_proj.pow(2).mean(-1, keepdim=True).sqrt(),
                          atol=1e-5)
    for c in (0.5, 4.0):
        with torch.no_grad():
            scaled = m3dec.LanguageReconstruction(C, "normalised").eval()
            scaled.load_state_dict(lfr.state_dict())
            scaled.w_proj.weight.mul_(c), scaled.w_proj.bias.mul_(c)
            _, proj_c = scaled(f_dec, words, sentence, TEXT_MASK)
            raw.w_proj.weight.mul_(c), raw.w_proj.bias.mul_(c)
            _, raw_c = raw(f_dec, words, sentence, TEXT_MASK)
            raw.w_proj.weight.div_(c), raw.w_proj.bias.div_(c)
        assert torch.allclose(raw_c, c * raw_proj, atol=1e-5)  # ... the paper's target moves
        assert torch.allclose(proj_c, f_proj, atol=1e-3)  # ... the normalised one does not
    # gradients still flow into the target
    lfr.train()
    words.requires_grad_()
    f_rec, f_proj = lfr(f_dec, words, sentence, TEXT_MASK)
    F.mse_loss(f_rec, f_proj).backward()
    assert words.grad.abs().sum() > 0 and lfr.w_proj.weight.grad.abs().sum() > 0


def test_lfr_target_choices_are_checked():
    with pytest.raises(ValueError, match="lfr_target must be one of"):
        build("m3dec", lfr_target="stop")


# Mask Decoder (Sec. III-D, Fig. 6) -----------------------------------------------------------


def test_fig6_mask_decoder_kernels_are_a_1x1_convolution_over_fenc():
    """Self-attention on F_dec (residual, LayerNorm), its words as the kernels of a 1x1 conv over
    F_enc: N_t maps (zero channels beyond the real words, up to max_len), then the convs."""
    torch.manual_seed(0)
    h = w = 3
    max_len = 7
    dec = randomise(m3dec.MaskDecoder(C, HEADS, max_len, mask_dim=6, dropout=0.0))
    f_dec, f_enc = torch.randn(2, L, C), torch.randn(2, C, h, w)
    seen = {}
    dec.convs.register_forward_hook(lambda m, i, o: seen.update(maps=i[0]))
    out = dec(f_dec, f_enc, TEXT_MASK)
    kernels = dec.norm(f_dec + dec.self_attn(f_dec, f_dec, f_dec, key_mask=TEXT_MASK))
    for b in range(2):
        n = int(TEXT_MASK[b].sum())
        conv = F.conv2d(f_enc[b : b + 1], kernels[b, :n, :, None, None])[0]  # (n, h, w)
        assert torch.allclose(seen["maps"][b, :n], conv, atol=1e-5)
        assert torch.equal(seen["maps"][b, n:], torch.zeros(max_len - n, h, w))
    assert out.shape == (2, 1, 8 * h, 8 * w)  # three 2x upsamplings: stride 16 -> 2


def test_fig6_mask_decoder_has_four_convs_with_upsampling_between():
    dec = m3dec.MaskDecoder(C, HEADS, 7, mask_dim=6, dropout=0.0)
    kinds = [type(m).__name__ for m in dec.convs]
    assert kinds == ["Sequential", "Upsample", "Sequential", "Upsample", "Sequential", "Upsample",
                     "Conv2d"]
    convs = [m for m in dec.convs.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) for c in convs)
    assert [c.in_channels for c in convs] == [7, 6, 6, 6] and convs[-1].out_channels == 1
    # "BN and ReLU unless noted": after the first three convs, not after the logits
    for block in dec.convs[:5:2]:
        assert isinstance(block[1], torch.nn.BatchNorm2d) and isinstance(block[2], torch.nn.ReLU)
    assert math.isclose(torch.sigmoid(convs[-1].bias).item(), m3dec.FOREGROUND_PRIOR, rel_tol=1e-5)


def test_fig6_padded_words_change_no_mask():
    torch.manual_seed(0)
    dec = randomise(m3dec.MaskDecoder(C, HEADS, 7, mask_dim=6, dropout=0.0))
    f_dec, f_enc = torch.randn(1, L, C), torch.randn(1, C, 3, 3)
    mask = torch.tensor([[True, True, True, False, False]])
    a = dec(f_dec, f_enc, mask)
    f_dec2 = f_dec.clone()
    f_dec2[:, 3:] = 7.0
    assert torch.allclose(a, dec(f_dec2, f_enc, mask), atol=1e-5)


def test_table3_concate_sums_the_words_and_tiles_them_beside_fenc():
    torch.manual_seed(0)
    dec = randomise(m3dec.MaskDecoder(C, HEADS, 7, mask_dim=6, dropout=0.0, concat=True))
    f_dec, f_enc = torch.randn(2, L, C), torch.randn(2, C, 3, 3)
    seen = {}
    dec.convs.register_forward_hook(lambda m, i, o: seen.update(maps=i[0]))
    dec(f_dec, f_enc, TEXT_MASK)
    kernels = dec.norm(f_dec + dec.self_attn(f_dec, f_dec, f_dec, key_mask=TEXT_MASK))
    for b in range(2):
        n = int(TEXT_MASK[b].sum())
        summed = kernels[b, :n].sum(0)
        assert torch.allclose(seen["maps"][b, :C], f_enc[b])
        for y in range(3):
            for x in range(3):
                assert torch.allclose(seen["maps"][b, C:, y, x], summed, atol=1e-5)


# The whole model (Fig. 2): wiring, position encoding, loss (Eq. 5) ---------------------------


@pytest.fixture(scope="module")
def traced():
    """One eval forward of tiny with the inputs and outputs of every stage recorded."""
    model = randomise(build("m3dec"), seed=1)
    batch = make_batch(model, n=2)
    seen: dict[str, list] = {}

    def keep(name):
        def hook(module, args, out):
            seen.setdefault(name, []).append((args, out))
        return hook

    handles = [model.neck.register_forward_hook(keep("neck")),
               model.encoder[0].register_forward_hook(keep("enc0")),
               model.encoder[-1].register_forward_hook(keep("enc_last")),
               model.text_proj.register_forward_hook(keep("text_proj")),
               model.mask_decoder.register_forward_hook(keep("mask_decoder"))]
    handles += [layer.register_forward_hook(keep(f"dec{n}")) for n, layer in
                enumerate(model.decoder)]
    handles += [block.register_forward_hook(keep(f"imi{n}")) for n, block in enumerate(model.imi)]
    with torch.no_grad():
        out = model(**model.inputs_from(batch))
    for h in handles:
        h.remove()
    return model, batch, seen, out


def test_sec3_encoder_input_is_fvis_plus_the_2d_sine_encoding_once(traced):
    model, _, seen, _ = traced
    f_vis = seen["neck"][0][1]  # (B, C, h, w)
    B, C_, h, w = f_vis.shape
    pos = torch.zeros(h * w, C_)  # DETR's encoding: y in the first half, x in the second
    quarter = C_ // 4
    for y in range(h):
        for x in range(w):
            for i in range(quarter):
                f = 10000 ** (i / quarter)
                pos[y * w + x, i], pos[y * w + x, quarter + i] = math.sin(y / f), math.cos(y / f)
                pos[y * w + x, 2 * quarter + i] = math.sin(x / f)
                pos[y * w + x, 3 * quarter + i] = math.cos(x / f)
    enc_in = seen["enc0"][0][0][0]
    assert torch.allclose(enc_in, f_vis.flatten(2).transpose(1, 2) + pos, atol=1e-5)
    assert len(model.encoder) == model.cfg.enc_layers == 2
    # later layers take the previous layer's output, with no second encoding
    assert torch.equal(seen["enc_last"][0][0][0], seen["enc0"][0][1])


def test_sec3b_decoder_layers_and_imi_alternate_with_the_language_chain(traced):
    """F_t is the first layer's query; each IMI block sits between two M3Dec layers, takes the
    previous block's F_l (the first: F_t) and its F'_dec is the next layer's query; the last
    layer's output goes to the Mask Decoder (and LFR)."""
    model, batch, seen, _ = traced
    n_layers = model.cfg.dec_layers
    assert len(model.imi) == n_layers - 1
    words = seen["text_proj"][0][1] * batch["text_mask"][..., None]  # F_t (B, L, C)
    assert torch.allclose(seen["dec0"][0][0][0], words)
    assert torch.allclose(seen["imi0"][0][0][1], words)  # the first IMI's language input: F_t
    for n in range(1, n_layers - 1):
        assert torch.equal(seen[f"imi{n}"][0][0][1], seen[f"imi{n - 1}"][0][1][1])  # F_l^{n-1}
    for n in range(n_layers - 1):
        assert torch.equal(seen[f"imi{n}"][0][0][0], seen[f"dec{n}"][0][1][0])
        assert torch.equal(seen[f"dec{n + 1}"][0][0][0], seen[f"imi{n}"][0][1][0])
    f_enc = seen["enc_last"][0][1]
    for n in range(n_layers):
        assert torch.equal(seen[f"dec{n}"][0][0][1], f_enc)  # F_enc into every layer
    assert torch.equal(seen["mask_decoder"][0][0][0], seen[f"dec{n_layers - 1}"][0][1][0])
    grid = f_enc.transpose(1, 2).unflatten(2, (model.grid, model.grid))
    assert torch.equal(seen["mask_decoder"][0][0][1], grid)


def test_sec3b_imi_language_path_changes_between_blocks(traced):
    """IMI's language path is a chain: the second block's F_l^2 is computed from F_l^1, so
    changing the first block's language linear layer changes what the second block sees."""
    model, batch, seen, _ = traced
    got = {}
    handle = model.imi[1].register_forward_hook(lambda m, a, o: got.update(f_l=a[1]))
    weight = model.imi[0].to_lang.weight
    try:
        with torch.no_grad():
            weight.mul_(-1.0)
            model(**model.inputs_from(batch))
    finally:
        with torch.no_grad():
            weight.mul_(-1.0)
        handle.remove()
    assert (seen["imi1"][0][0][1] - got["f_l"]).abs().max() > 1e-3


def test_sec3_mask_logits_are_the_mask_decoder_output_resized_to_the_input(traced):
    model, batch, seen, out = traced
    low = seen["mask_decoder"][0][1]
    H, W = batch["image"].shape[-2:]
    ref = F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    assert torch.allclose(out["mask_logits"], ref)


def test_eq5_loss_is_weighted_bce_plus_weighted_reconstruction_mse():
    model = randomise(build("m3dec", w_mask=0.7, w_rec=0.3), seed=2)
    batch = make_batch(model, n=2)
    with torch.no_grad():
        out = model(**model.inputs_from(batch), target=batch["mask"])
    p, t = torch.sigmoid(out["mask_logits"]), batch["mask"]
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    mse = ((out["lang_rec"] - out["lang_proj"]) ** 2).mean()
    assert torch.allclose(out["loss_mask"], bce, atol=1e-5)
    assert torch.allclose(out["loss_rec"], mse, atol=1e-6)
    assert torch.allclose(out["loss"], 0.7 * bce + 0.3 * mse, atol=1e-5)
    # LFR's F_rec is computed from the last decoder output, F_proj from F_t and F_t'
    assert out["lang_rec"].shape == out["lang_proj"].shape == (2, model.cfg.dim)
    no_lfr = randomise(build("m3dec", w_mask=0.7, lfr=False), seed=2)
    with torch.no_grad():
        out2 = no_lfr(**no_lfr.inputs_from(batch), target=batch["mask"])
    assert "loss_rec" not in out2
    assert torch.allclose(out2["loss"], 0.7 * out2["loss_mask"])


def test_forward_contract():
    """Inputs (image (B,3,H,W) float, text (B,L) int64, text_mask (B,L) bool, target (B,1,H,W)
    0/1) and outputs: logits (B,1,H,W) float; the loss terms with a target only."""
    model = build("m3dec")
    assert list(model.input_names)[:3] == ["image", "text", "text_mask"]
    batch = make_batch(model, n=2)
    inputs = model.inputs_from(batch)
    assert inputs["image"].shape == (2, 3, 128, 128) and inputs["image"].dtype == torch.float32
    assert inputs["text"].dtype == torch.int64 and inputs["text_mask"].dtype == torch.bool
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    assert out["mask_logits"].shape == (2, 1, 128, 128)
    assert out["mask_logits"].dtype == torch.float32
    assert out["mutual_attn"].shape == (2, inputs["text"].shape[1], model.grid**2)
    assert not any(k.startswith("loss") for k in out)
    model.train()
    out = model(**inputs, target=batch["mask"])
    assert {k for k in out if k.startswith("loss")} == {"loss", "loss_mask", "loss_rec"}
    assert all(out[k].shape == () for k in ("loss", "loss_mask", "loss_rec"))


def test_fig6_mask_decoder_takes_exactly_max_len_words_and_refuses_more():
    """The first conv has max_len input channels: a sentence of exactly max_len words fills them
    (no padding), one word more is refused by name rather than failing inside the conv."""
    dec = m3dec.MaskDecoder(C, HEADS, L, mask_dim=6, dropout=0.0).eval()
    f_enc = torch.randn(1, C, 3, 3)
    out = dec(torch.randn(1, L, C), f_enc, torch.ones(1, L, dtype=torch.bool))
    assert out.shape == (1, 1, 24, 24)
    with pytest.raises(ValueError, match=f"{L + 1} words exceed max_len={L}"):
        dec(torch.randn(1, L + 1, C), f_enc, torch.ones(1, L + 1, dtype=torch.bool))
