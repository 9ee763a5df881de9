"""Fused attention and torch.compile leave outputs unchanged (within float tolerance): SAM's
attention on `F.scaled_dot_product_attention` against segment-anything's own, `common.layers.
Attention` against a direct softmax(q k^T / sqrt(d)) v, and every tiny model under torch.compile
against eager."""

import math

import pytest
import torch
from helpers import MODEL_NAMES, build, make_batch

from common.encoders.sam import _sdpa_sam_attention
from common.layers import Attention


@pytest.mark.parametrize("rel_pos", [True, False])
def test_sam_sdpa_attention_matches_segment_anything(rel_pos):
    from segment_anything.modeling.image_encoder import Attention as SAMAttention

    torch.manual_seed(0)
    ref = SAMAttention(32, num_heads=4, use_rel_pos=rel_pos, input_size=(6, 5))
    if rel_pos:  # zero at initialisation: make the relative positions matter
        torch.nn.init.normal_(ref.rel_pos_h)
        torch.nn.init.normal_(ref.rel_pos_w)
    fused = _sdpa_sam_attention()(32, num_heads=4, use_rel_pos=rel_pos, input_size=(6, 5))
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 5, 32)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-4)


def test_attention_matches_the_direct_formula():
    torch.manual_seed(0)
    attn = Attention(16, heads=4, kv_dim=8).eval()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    key_mask = torch.ones(2, 7, dtype=torch.bool)
    key_mask[1, 4:] = False  # padded keys
    got = attn(q, kv, kv, key_mask)

    heads = lambda x: x.unflatten(-1, (4, 4)).transpose(1, 2)  # (B, 4, T, 4)
    Q, K, V = heads(attn.to_q(q)), heads(attn.to_k(kv)), heads(attn.to_v(kv))
    scores = Q @ K.transpose(-1, -2) / math.sqrt(4)
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    want = attn.to_out((scores.softmax(-1) @ V).transpose(1, 2).flatten(2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_compile_leaves_outputs_unchanged(name):
    """torch.compile's graph capture (dynamo + AOT autograd, the "aot_eager" backend): the
    captured graph, forward and backward, computes what eager does. (train.py --compile uses the
    default inductor backend, whose C++ code generation takes minutes on this CPU: measured in
    the benchmark, not here.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(name).train()
    batch = make_batch(model, n=2)
    inputs = model.inputs_from(batch)
    torch.manual_seed(1)  # the same dropout masks, if a config has dropout
    eager = model(**inputs, target=batch["mask"])
    eager["loss"].backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    compiled = torch.compile(model, backend="aot_eager")(**inputs, target=batch["mask"])
    compiled["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch.testing.assert_close(compiled["mask_logits"], eager["mask_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled["loss"], eager["loss"], atol=1e-5, rtol=1e-5)
    assert len(grads) == len(eager_grads)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-3)
